"""The fine-tuning wrapper: source weights, LoRA adapters, frozen parameters.

Active when a run starts from a pretrained source (``finetune.init_from``), trains in a
mode other than ``full``, or is a fine-tuning task (its report records a scratch start).

* :func:`prepare`: pretrains the source first when ``finetune.pretrain_config`` says so
  (never into an HF directory or a directory that is not a run of ours), then copies the
  source's architecture and tokenizer into the config.
* :func:`wrap`: LoRA adapters on the base model (``mode='lora'``), the mode's trainable
  filter (frozen parameters are outside the optimizer's ``wrt``: no gradient, no
  optimizer state), LoRA dropout switched by ``deterministic``, and the initialisation
  hook that loads the source's parameters and writes ``init_report.json``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import ml_collections
from flax import nnx

from research.finetune import init as init_lib
from research.tasks import Task

NAME = 'finetune'
HEAD = 'head'  # Path component of a task's new head (SequenceClassifier.head).


def trainable_filter(mode: str) -> Any:
  """The nnx filter of parameters the optimizer updates in ``mode``.

  A task without a ``head`` simply matches no head parameter; ``linear_probe`` on such a
  task is refused by research/feature_validation.py.
  """
  head = nnx.All(nnx.Param, nnx.PathContains(HEAD))
  if mode == 'lora':
    return nnx.Any(nnx.LoRAParam, head)
  if mode == 'linear_probe':
    return head
  return nnx.Param


def _source_path(path: str) -> str:
  """``finetune.init_from`` as an absolute path (relative: to the current directory)."""
  path = os.path.abspath(os.path.expanduser(path))
  return os.path.dirname(path) if os.path.basename(path) == 'checkpoints' else path


def prepare(config: ml_collections.ConfigDict, workdir: str | None, ctx) -> None:
  f = config.finetune
  if not f.init_from:
    return
  f.init_from = _source_path(f.init_from)
  ctx.ensure_trained(f.init_from, f.pretrain_config, f.pretrain_overrides,
                     'finetune.pretrain_config')
  init_lib.take_architecture(config, workdir)


def tokenizer(config: ml_collections.ConfigDict, default):
  if not config.finetune.init_from:
    return default
  return init_lib.source_tokenizer(config, default)


def _build_with_lora(build, f: ml_collections.ConfigDict, seed: int) -> nnx.Module:
  from research.models import lora
  model = build()
  lora.apply_lora(model, rank=f.lora_rank, alpha=f.lora_alpha, targets=f.lora_targets,
                  dropout=f.lora_dropout, seed=seed + 7)
  return model


def _forward_with_lora_mode(forward, model, batch, deterministic: bool):
  from research.models import lora
  lora.set_lora_deterministic(model, deterministic)
  return forward(model, batch, deterministic)


def wrap(task: Task, config: ml_collections.ConfigDict, ctx) -> Task:
  del ctx
  f = config.finetune
  changes: dict[str, Any] = {}
  if f.mode != 'full':
    changes['trainable'] = trainable_filter(f.mode)
  if f.mode == 'lora':
    changes['build_model'] = functools.partial(_build_with_lora, task.build_model, f,
                                               int(config.seed))
    changes['forward'] = functools.partial(_forward_with_lora_mode, task.forward)
  trainable = changes.get('trainable', task.trainable)
  changes['initialize'] = task.then_initialize(
      functools.partial(init_lib.initialize, config, trainable))
  return task.wrapped(NAME, **changes)
