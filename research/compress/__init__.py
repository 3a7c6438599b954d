"""Model compression: knowledge distillation and pruning (README "Compression").

Both are ordinary ``launch.train`` runs with a ``distill`` / ``prune`` config section;
:func:`adapt_task` (called by ``research.tasks.make_task``) wraps the task:

* ``distill.teacher`` (a run workdir of ours, or an HF checkpoint dir) with
  ``distill.alpha > 0``: the student's training loss becomes
  ``(1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T)``
  (:mod:`research.compress.distill`). The teacher lives inside the model as
  ``model.teacher`` with its weights in :class:`distill.TeacherParam` variables (not
  ``nnx.Param``): they are sharded by their logical axes like the student's, part of the
  jitted step and the checkpoint, but outside the optimizer (no gradient, no state).
* ``prune.method`` (``magnitude`` with Zhu & Gupta's cubic schedule, ``nm`` N:M,
  ``structured`` heads / MLP neurons): every pruned kernel gets a
  :class:`prune.PruneMask` variable beside it; the masks are applied before the forward
  pass and after every optimizer update inside the jitted step
  (:mod:`research.compress.prune`), and saved in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import ml_collections

from research.config import ConfigError

PRUNE_METHODS = ('none', 'magnitude', 'nm', 'structured')
STRUCTURES = ('heads', 'mlp', 'both')
DISTILL_TASKS = ('lm', 'classification')


def _num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_compress_config(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigErrors naming the ``distill.*`` / ``prune.*`` key and the fix."""
  d, p = config.distill, config.prune
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
  if p.method not in PRUNE_METHODS:
    raise ConfigError(f'prune.method={p.method!r} is unknown; use one of '
                      f'{", ".join(map(repr, PRUNE_METHODS))}.')
  if p.method == 'none':
    return
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
  if p.begin_step > config.steps:
    raise ConfigError(f'prune.begin_step={p.begin_step} is after the last step '
                      f'(steps={config.steps}); lower it.')
  if p.method == 'nm' and not (_int(p.n) and _int(p.m) and 0 < p.n < p.m):
    raise ConfigError(f'prune.n={p.n!r}, prune.m={p.m!r}: N:M pruning needs integers '
                      f'0 < n < m (e.g. 2 and 4).')
  if p.structure not in STRUCTURES:
    raise ConfigError(f'prune.structure={p.structure!r} is unknown; use one of '
                      f'{", ".join(map(repr, STRUCTURES))}.')
  try:
    re.compile(p.targets)
  except re.error as e:
    raise ConfigError(f'prune.targets is not a valid regex: {e}.') from None
  if config.finetune.mode != 'full':
    raise ConfigError(f'prune.method={p.method!r} needs finetune.mode=\'full\' (got '
                      f'{config.finetune.mode!r}); merge LoRA adapters first '
                      f'(research.finetune.export).')
  if config.quant.mode == 'qat':
    raise ConfigError(f'prune.method={p.method!r} cannot be combined with quant.mode=\'qat\'; '
                      f'prune first, then quantize the pruned run (quant.mode=ptq).')


def distill_active(config: ml_collections.ConfigDict) -> bool:
  return bool(config.distill.teacher) and config.distill.alpha > 0


def adapt_task(task, config: ml_collections.ConfigDict):
  """``task`` with distillation and/or pruning (identity when both are off)."""
  validate_compress_config(config)
  distill_on = distill_active(config)
  prune_on = config.prune.method != 'none'
  if not distill_on and not prune_on:
    return task
  from research.compress import distill, prune
  changes = {}
  build, objective = task.build_model, task.objective
  if distill_on:
    build = functools.partial(distill.build_with_teacher, build, config)
    objective = distill.make_objective(task, config)
    changes['initialize'] = functools.partial(distill.initialize, config)
  if prune_on:
    build = functools.partial(prune.build_with_masks, build, config.prune)
    objective = functools.partial(prune.masked_objective, objective, config.prune)
    changes['post_update'] = functools.partial(prune.post_update, config.prune)
    changes['at_end'] = functools.partial(prune.at_end, config.prune)
  changes.update(build_model=build, objective=objective)
  return dataclasses.replace(task, **changes)
