"""Language modelling: next-token prediction on packed windows (pretraining)."""

from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from research.data import pipeline
from research.models import loss as loss_lib
from research.models.transformer import Transformer
from research.tasks import Task


def lm_forward(model, batch, deterministic: bool, *, return_hidden: bool = False,
               return_aux: bool = False):
  """Logits [B, L, V] (or the final hidden states [B, L, D] for a chunked loss).

  Packed windows with ``data.document_masking`` carry ``segment_ids`` (tokens attend
  only within their document) and ``positions`` restarting at each document.
  ``return_aux`` (mixture-of-experts models): ``(that, the MoE aux losses)``.
  """
  return model(batch['inputs'], deterministic=deterministic, return_hidden=return_hidden,
               segment_ids_BL=batch.get('segment_ids'), positions_BL=batch.get('positions'),
               **({'return_aux': True} if return_aux else {}))


def lm_loss(model, outputs, batch, deterministic: bool, *, z_loss: float = 0.0,
            chunk_size: int = 0, moe_lb_loss: float = 0.0, moe_z_loss: float = 0.0):
  """Mean next-token CE over real tokens (float32), plus the z-loss term.

  ``chunk_size`` > 0: ``outputs`` are hidden states and the head is applied a sequence
  chunk at a time (loss.chunk_size), so the float32 logits are never all in memory.
  ``outputs`` ``(out, moe_aux)`` (a forward with ``return_aux``): the MoE load-balancing
  and router z-losses are added with weights ``moe_lb_loss`` / ``moe_z_loss`` and
  logged (unweighted) beside the CE, which stays the ``loss`` metric.
  """
  del deterministic
  moe_aux = {}
  if isinstance(outputs, tuple):
    outputs, moe_aux = outputs
  if chunk_size:
    loss, aux = loss_lib.chunked_lm_loss(outputs, model.logits, batch['targets'],
                                         batch['mask'], z_loss, chunk_size)
  else:
    loss, aux = loss_lib.lm_loss(outputs, batch['targets'], batch['mask'], z_loss)
  if moe_aux:
    loss = loss + moe_lb_loss * moe_aux['moe_lb_loss'] + moe_z_loss * moe_aux['moe_z_loss']
  return loss, {'loss': aux['ce'], 'z_loss': aux['z_loss'], **moe_aux}


def lm_task_fns(config: ml_collections.ConfigDict) -> dict:
  """forward and loss of a next-token task under ``config.loss``."""
  chunk = int(config.loss.chunk_size)
  m = config.model
  return {'forward': functools.partial(lm_forward, return_hidden=bool(chunk),
                                       return_aux=bool(m.moe_num_experts)),
          'loss': functools.partial(lm_loss, z_loss=config.loss.z_loss, chunk_size=chunk,
                                    moe_lb_loss=m.moe_lb_loss, moe_z_loss=m.moe_z_loss)}


def build_transformer(config: ml_collections.ConfigDict) -> Transformer:
  return Transformer(config.model, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def make_task(config: ml_collections.ConfigDict) -> Task:
  return Task(name='lm', make_iterator=pipeline.make_lm_iterator,
              build_model=functools.partial(build_transformer, config), decode_samples=True,
              **lm_task_fns(config))
