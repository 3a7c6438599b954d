"""Fine-tuning: modes (full, LoRA, linear probe) and initialisation from a pretrained model.

A fine-tuning run is an ordinary ``launch.train`` run of a task (``task=classification``,
``sft``, or ``lm`` for continued pretraining) with a ``finetune`` config section:

* ``finetune.init_from``: a pretraining workdir (or its ``checkpoints/`` dir) of ours,
  any step (``finetune.init_step``) and any mesh, or a Hugging Face checkpoint
  directory (``config.json`` + ``*.safetensors``; Llama-family or GPT-2). The backbone
  architecture and the tokenizer come from the source (:mod:`research.finetune.init`).
  Empty: from scratch.
* ``finetune.mode``: ``full`` (every parameter trains), ``lora`` (only the adapters of
  :mod:`research.models.lora`, plus a new task head), ``linear_probe`` (only the head).
  Frozen parameters are outside the optimizer's ``wrt`` filter: they get no gradient
  and no optimizer state (:func:`trainable_filter`).

The trainer calls three hooks: :func:`adapt_task` (from ``research.tasks.make_task``),
``init.prepare`` (before the tokenizer is built) and ``init.initialize`` (on a fresh
start, after the sharded state is created). Pretraining runs never touch them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
from flax import nnx

from research.config import ConfigError

MODES = ('full', 'lora', 'linear_probe')
POOLINGS = ('last', 'mean', 'first')
HEAD = 'head'  # Path component of a task's new head (SequenceClassifier.head).


def is_finetune(config: ml_collections.ConfigDict) -> bool:
  """Whether a run needs the fine-tuning initialisation (source, adapters or freezing)."""
  f = config.finetune
  return bool(f.init_from) or f.mode != 'full'


def validate_finetune_config(config: ml_collections.ConfigDict) -> None:
  f = config.finetune
  if f.mode not in MODES:
    raise ConfigError(f'finetune.mode={f.mode!r} is unknown; use one of {MODES}.')
  if f.mode == 'lora':
    if not isinstance(f.lora_rank, int) or f.lora_rank <= 0:
      raise ConfigError(f'finetune.lora_rank={f.lora_rank!r} must be a positive integer.')
    if not 0.0 <= f.lora_dropout < 1.0:
      raise ConfigError(f'finetune.lora_dropout={f.lora_dropout!r} must be in [0, 1).')
  if f.pooling not in POOLINGS:
    raise ConfigError(f'finetune.pooling={f.pooling!r} is unknown; use one of {POOLINGS}.')
  if f.init_step < -1:
    raise ConfigError(f'finetune.init_step={f.init_step} must be -1 (latest) or a step.')
  for rule in f.pretrain_overrides:
    if len(rule) != 2:
      raise ConfigError(f'finetune.pretrain_overrides entries are (key, value) pairs, '
                        f'got {rule!r}.')


def trainable_filter(mode: str, has_head: bool) -> Any:
  """The nnx filter of parameters the optimizer updates in ``mode``."""
  head = nnx.All(nnx.Param, nnx.PathContains(HEAD))
  if mode == 'full':
    return nnx.Param
  if mode == 'lora':
    return nnx.Any(nnx.LoRAParam, head) if has_head else nnx.LoRAParam
  if mode == 'linear_probe':
    if not has_head:
      raise ConfigError("finetune.mode='linear_probe' trains only a new task head, and this "
                        "task has none; use task=classification, or mode=lora/full.")
    return head
  raise ConfigError(f'finetune.mode={mode!r} is unknown; use one of {MODES}.')


def _build_adapted(build, f: ml_collections.ConfigDict, seed: int):
  from research.models import lora
  model = build()
  lora.apply_lora(model, rank=f.lora_rank, alpha=f.lora_alpha, targets=f.lora_targets,
                  dropout=f.lora_dropout, seed=seed + 7)
  return model


def _objective_with_lora_mode(objective, model, batch, deterministic: bool, **kw):
  from research.models import lora
  lora.set_lora_deterministic(model, deterministic)
  return objective(model, batch, deterministic, **kw)


def adapt_task(task, config: ml_collections.ConfigDict):
  """The task with LoRA adapters and the mode's trainable filter (identity for 'full')."""
  validate_finetune_config(config)
  f = config.finetune
  if f.mode == 'full':
    return task
  has_head = task.name == 'classification'
  changes: dict[str, Any] = {'trainable': trainable_filter(f.mode, has_head)}
  if f.mode == 'lora':
    try:
      import re
      re.compile(f.lora_targets)
    except re.error as e:
      raise ConfigError(f'finetune.lora_targets is not a valid regex: {e}.') from None
    changes['build_model'] = functools.partial(_build_adapted, task.build_model, f,
                                               int(config.seed))
    changes['objective'] = functools.partial(_objective_with_lora_mode, task.objective)
  return dataclasses.replace(task, **changes)
