"""Language modelling: next-token prediction on packed windows (pretraining)."""

from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from research import quant
from research.data import pipeline
from research.models import loss as loss_lib
from research.models.transformer import Transformer
from research.tasks import Task


def lm_objective(model, batch, deterministic: bool, *, z_loss: float = 0.0,
                 chunk_size: int = 0):
  """Mean next-token CE over real tokens (float32), plus the z-loss term.

  ``chunk_size`` > 0 computes the loss a sequence chunk at a time (loss.chunk_size).
  """
  if chunk_size:
    hidden = model(batch['inputs'], deterministic=deterministic, return_hidden=True)
    loss, aux = loss_lib.chunked_lm_loss(hidden, model.logits, batch['targets'],
                                         batch['mask'], z_loss, chunk_size)
  else:
    logits = model(batch['inputs'], deterministic=deterministic)
    loss, aux = loss_lib.lm_loss(logits, batch['targets'], batch['mask'], z_loss)
  return loss, {'loss': aux['ce'], 'z_loss': aux['z_loss']}


def make_task(config: ml_collections.ConfigDict) -> Task:
  def build():
    model = Transformer(config.model, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
    return quant.quantize_for_training(model, config)  # quant.mode='qat': fake-quant matmuls.

  return Task(name='lm', objective=functools.partial(lm_objective, z_loss=config.loss.z_loss,
                                                    chunk_size=config.loss.chunk_size),
              make_iterator=pipeline.make_lm_iterator, build_model=build, decode_samples=True)
