"""``quant.init_from``: start QAT fine-tuning (or its float baseline) from a float run.

The run's model (float, or fake-quantized with ``quant.mode='qat'``) takes the source's
latest parameters by path; the optimizer starts fresh. The source must have this
model's shape (same tokenizer, same ``model.*`` shape keys).
"""

from __future__ import annotations

import functools

import ml_collections
from absl import logging

from research import runs
from research.config import ConfigError
from research.tasks import Task

NAME = 'quant_init'
SHAPE_KEYS = ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
              'mlp_kind', 'norm', 'positions', 'tie_embeddings', 'scan_layers', 'use_bias',
              'rope_scaling', 'sliding_window', 'window_layers')


def check_source(run_dir: str, config: ml_collections.ConfigDict) -> None:
  """One line naming the first ``model.*`` key on which the source and this run differ."""
  if not runs.has_checkpoint(run_dir):
    raise ConfigError(f'quant.init_from={run_dir!r} has no checkpoint; train the float '
                      'model there first (or fix the path).')
  src = runs.read_config(run_dir).model
  if config.model.vocab_size and src.vocab_size != config.model.vocab_size:
    raise ConfigError(
        f'quant.init_from: {run_dir} has model.vocab_size={src.vocab_size} but this run '
        f'has {config.model.vocab_size}; use the same tokenizer and model.')
  for k in SHAPE_KEYS:
    if src[k] != config.model[k]:
      raise ConfigError(
          f'quant.init_from: {run_dir} has model.{k}={src[k]!r} but this run has '
          f'{config.model[k]!r}; the quantized model must have the float model\'s shape.')


def prepare(config: ml_collections.ConfigDict, workdir: str | None, ctx) -> None:
  """Resolves ``quant.init_from`` and checks it fits, before anything is built."""
  del ctx
  config.quant.init_from = runs.resolve(config.quant.init_from, workdir)
  check_source(config.quant.init_from, config)


def _initialize(config: ml_collections.ConfigDict, ts, workdir: str):
  del workdir
  run_dir = config.quant.init_from
  arrays, report = runs.restore_params(run_dir, -1, ts.state[0], what='quant.init_from')
  logging.info('Starting from the weights of %s (step %d), fresh optimizer (quant.mode=%s)',
               run_dir, report['step'], config.quant.mode)
  return runs.replace_params(ts.state, arrays)


def wrap(task: Task, config: ml_collections.ConfigDict, ctx) -> Task:
  del ctx
  return task.wrapped(NAME, initialize=task.then_initialize(
      functools.partial(_initialize, config)))
