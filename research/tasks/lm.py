"""Language modelling: next-token prediction on packed windows (pretraining)."""

from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from research.data import pipeline
from research.models import loss as loss_lib
from research.models.transformer import Transformer
from research.tasks import Task


def lm_objective(model, batch, deterministic: bool, *, z_loss: float = 0.0):
  """Mean next-token CE over real tokens (float32), plus the z-loss term."""
  logits = model(batch['inputs'], deterministic=deterministic)
  loss, aux = loss_lib.lm_loss(logits, batch['targets'], batch['mask'], z_loss)
  return loss, {'loss': aux['ce'], 'z_loss': aux['z_loss']}


def make_task(config: ml_collections.ConfigDict) -> Task:
  def build():
    return Transformer(config.model, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))

  return Task(name='lm', objective=functools.partial(lm_objective, z_loss=config.loss.z_loss),
              make_iterator=pipeline.make_lm_iterator, build_model=build, decode_samples=True)
