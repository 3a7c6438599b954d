"""Checks of the feature sections: ``quant``, ``finetune``, ``distill``, ``prune``.

Pure config inspection: importing this module imports no feature package, so the
trainer's one-pass validation (:func:`research.validation.validate_config`) covers
every section before anything is built. Each failure is a one-line
:class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import re

import ml_collections

from research.config import (DISTILL_TASKS, FINETUNE_MODES, POOLINGS, PRUNE_METHODS,
                             PRUNE_STRUCTURES, QUANT_BITS, QUANT_GRANULARITIES,
                             QUANT_MODES, ConfigError)


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _regex(value: str, key: str) -> None:
  try:
    re.compile(value)
  except re.error as e:
    raise ConfigError(f'{key}={value!r} is not a valid regex ({e}).') from None


def _choices(xs) -> str:
  return ', '.join(map(repr, xs))


def validate_quant(q: ml_collections.ConfigDict) -> None:
  """The ``quant`` section (research/quant/)."""
  if q.mode not in QUANT_MODES:
    raise ConfigError(f'quant.mode={q.mode!r} is unknown; use one of {_choices(QUANT_MODES)}.')
  if not _int(q.weight_bits) or q.weight_bits not in QUANT_BITS:
    raise ConfigError(f'quant.weight_bits={q.weight_bits!r} is not supported; use 8, 4 or 2.')
  if not _int(q.act_bits) or q.act_bits not in (0, 8, 4):
    raise ConfigError(
        f'quant.act_bits={q.act_bits!r} is not supported; use 0 (float activations), 8 or 4.')
  if q.granularity not in QUANT_GRANULARITIES:
    raise ConfigError(f'quant.granularity={q.granularity!r} is unknown; use one of '
                      f'{_choices(QUANT_GRANULARITIES)}.')
  if q.granularity == 'group' and (not _int(q.group_size) or q.group_size < 2):
    raise ConfigError(f'quant.group_size={q.group_size!r} must be an integer >= 2 with '
                      "quant.granularity='group' (e.g. 32).")
  if not isinstance(q.symmetric, bool):
    raise ConfigError(f'quant.symmetric={q.symmetric!r} must be True or False.')
  if not q.symmetric and q.weight_bits == 2:
    raise ConfigError('quant.symmetric=False needs quant.weight_bits 8 or 4 (qwix has no '
                      'asymmetric int2); use quant.symmetric=True for 2 bits.')
  if not (_num(q.clip_ratio) and 0 < q.clip_ratio <= 1):
    raise ConfigError(f'quant.clip_ratio={q.clip_ratio!r} must be in (0, 1] (1: no clipping).')
  _regex(q.targets, 'quant.targets')
  if q.mode != 'none' and not q.targets:
    raise ConfigError(f'quant.mode={q.mode!r} needs quant.targets (a module-path regex).')
  if q.mode == 'ptq' and not q.init_from:
    raise ConfigError("quant.mode='ptq' needs quant.init_from=DIR (the float run to quantize).")


def validate_finetune(config: ml_collections.ConfigDict) -> None:
  """The ``finetune`` section (research/finetune/)."""
  f = config.finetune
  if f.mode not in FINETUNE_MODES:
    raise ConfigError(f'finetune.mode={f.mode!r} is unknown; use one of '
                      f'{_choices(FINETUNE_MODES)}.')
  # Ranges are checked whether or not the mode uses them: a wrong value is wrong.
  if not _int(f.lora_rank) or f.lora_rank <= 0:
    raise ConfigError(f'finetune.lora_rank={f.lora_rank!r} must be a positive integer.')
  if not _num(f.lora_alpha) or f.lora_alpha <= 0:
    raise ConfigError(f'finetune.lora_alpha={f.lora_alpha!r} must be > 0.')
  if not _num(f.lora_dropout) or not 0.0 <= f.lora_dropout < 1.0:
    raise ConfigError(f'finetune.lora_dropout={f.lora_dropout!r} must be in [0, 1).')
  _regex(f.lora_targets, 'finetune.lora_targets')
  if f.mode == 'linear_probe' and config.task != 'classification':
    raise ConfigError("finetune.mode='linear_probe' trains only a new task head, and "
                      f"task={config.task!r} has none; use task=classification, or "
                      "mode=lora/full.")
  if f.pooling not in POOLINGS:
    raise ConfigError(f'finetune.pooling={f.pooling!r} is unknown; use one of '
                      f'{_choices(POOLINGS)}.')
  if not _int(f.init_step) or f.init_step < -1:
    raise ConfigError(f'finetune.init_step={f.init_step!r} must be -1 (latest) or a step.')
  for rule in f.pretrain_overrides:
    if len(rule) != 2:
      raise ConfigError(f'finetune.pretrain_overrides entries are (key, value) pairs, '
                        f'got {rule!r}.')


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """The ``distill`` section (research/compress/distill.py)."""
  d = config.distill
  if not _num(d.alpha) or not 0.0 <= d.alpha <= 1.0:
    raise ConfigError(f'distill.alpha={d.alpha!r} must be in [0, 1] (0: no distillation, '
                      f'1: only the teacher\'s soft targets).')
  if not _num(d.temperature) or d.temperature <= 0:
    raise ConfigError(f'distill.temperature={d.temperature!r} must be > 0 (e.g. 2.0).')
  if not _int(d.teacher_step) or d.teacher_step < -1:
    raise ConfigError(f'distill.teacher_step={d.teacher_step!r} must be -1 (latest) or a step.')
  if d.teacher and d.alpha > 0 and config.task not in DISTILL_TASKS:
    raise ConfigError(f'distill.teacher is set but task={config.task!r}; distillation '
                      f'supports task {" or ".join(DISTILL_TASKS)} (or set distill.teacher=\'\').')
  if d.teacher_config and not d.teacher:
    raise ConfigError('distill.teacher_config needs distill.teacher=DIR (where the teacher '
                      'is trained).')
  if d.teacher and d.alpha > 0 and config.loss.chunk_size:
    raise ConfigError('distill.teacher needs loss.chunk_size=0 (the distillation loss uses '
                      'the whole logits).')


def validate_prune(config: ml_collections.ConfigDict) -> None:
  """The ``prune`` section (research/compress/prune.py)."""
  p = config.prune
  if p.method not in PRUNE_METHODS:
    raise ConfigError(f'prune.method={p.method!r} is unknown; use one of '
                      f'{_choices(PRUNE_METHODS)}.')
  # Ranges are checked whether or not pruning is on: a wrong value is wrong.
  if not _num(p.sparsity) or not 0.0 <= p.sparsity < 1.0:
    raise ConfigError(f'prune.sparsity={p.sparsity!r} must be in [0, 1) (e.g. 0.5).')
  if not _num(p.initial_sparsity) or not 0.0 <= p.initial_sparsity <= p.sparsity:
    raise ConfigError(f'prune.initial_sparsity={p.initial_sparsity!r} must be in '
                      f'[0, prune.sparsity={p.sparsity}].')
  if not _int(p.begin_step) or p.begin_step < 1:
    raise ConfigError(f'prune.begin_step={p.begin_step!r} must be an integer >= 1 (the '
                      f'first step whose update is masked).')
  if not _int(p.end_step) or (p.end_step and p.end_step < p.begin_step):
    raise ConfigError(f'prune.end_step={p.end_step!r} must be 0 (one-shot at begin_step) '
                      f'or >= prune.begin_step={p.begin_step}.')
  if not _int(p.frequency) or p.frequency < 1:
    raise ConfigError(f'prune.frequency={p.frequency!r} must be a positive integer.')
  if not (_int(p.n) and _int(p.m) and 0 < p.n < p.m):
    raise ConfigError(f'prune.n={p.n!r}, prune.m={p.m!r}: N:M pruning needs integers '
                      f'0 < n < m (e.g. 2 and 4).')
  if p.structure not in PRUNE_STRUCTURES:
    raise ConfigError(f'prune.structure={p.structure!r} is unknown; use one of '
                      f'{_choices(PRUNE_STRUCTURES)}.')
  _regex(p.targets, 'prune.targets')
  if p.method == 'none':
    return
  if p.begin_step > config.steps:
    raise ConfigError(f'prune.begin_step={p.begin_step} is after the last step '
                      f'(steps={config.steps}); lower it.')
  if config.finetune.mode != 'full':
    raise ConfigError(f'prune.method={p.method!r} needs finetune.mode=\'full\' (got '
                      f'{config.finetune.mode!r}); merge LoRA adapters first '
                      f'(research.finetune.export).')
  if config.quant.mode == 'qat':
    raise ConfigError(f'prune.method={p.method!r} cannot be combined with quant.mode=\'qat\'; '
                      f'prune first, then quantize the pruned run (quant.mode=ptq).')


def validate_combinations(config: ml_collections.ConfigDict) -> None:
  """Rules across sections: one weight source per run, QAT's backward."""
  sources = [k for k, v in (('finetune.init_from', config.finetune.init_from),
                            ('quant.init_from', config.quant.init_from)) if v]
  if len(sources) == 2 and config.quant.mode != 'ptq':
    raise ConfigError('finetune.init_from and quant.init_from are both set; a run starts '
                      'from one set of weights: for QAT fine-tuning set quant.init_from only.')
  if config.quant.mode == 'qat' and config.model.projection_vjp != 'autodiff':
    raise ConfigError(
        f"model.projection_vjp={config.model.projection_vjp!r} bypasses qwix's QAT "
        f"backward (quant.mode='qat'); use model.projection_vjp='autodiff'.")


def validate_features(config: ml_collections.ConfigDict) -> None:
  validate_quant(config.quant)
  validate_finetune(config)
  validate_distill(config)
  validate_prune(config)
  validate_combinations(config)


def distill_active(config: ml_collections.ConfigDict) -> bool:
  return bool(config.distill.teacher) and config.distill.alpha > 0


def active_features(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The wrappers the recipe must apply to ``config``'s base task, in order.

  The trainer compares this with ``Task.features`` so that a feature config passed to
  the bare trainer fails loudly instead of training without the feature.
  """
  out = []
  if config.quant.mode == 'qat':
    out.append('qat')
  if config.quant.init_from and config.quant.mode != 'ptq':
    out.append('quant_init')
  f = config.finetune
  if config.task != 'lm' or f.init_from or f.mode != 'full':
    out.append('finetune')
  if distill_active(config):
    out.append('distill')
  if config.prune.method != 'none':
    out.append('prune')
  return tuple(out)
