"""Knowledge distillation (Hinton et al. 2015) from a frozen teacher.

Loss of the student (train steps only; evaluation reports the student's own task loss):

  (1 - alpha) * CE(labels, student) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))

averaged over real tokens (``task=lm``) or real examples (``task=classification``).
The ``T^2`` factor keeps the soft-target gradients' scale independent of ``T``.

The teacher is ``model.teacher``, a module built as its own run built it (our run's
``config.json``; LoRA runs included) or from an HF checkpoint, whose parameters are
:class:`TeacherParam` variables: not ``nnx.Param``, so the optimizer's ``wrt`` filter
leaves them out (no gradient, no optimizer state) and parameter counts ignore them, but
they are in the state the trainer shards (by their logical axes, like the student's),
passes through the jitted step and checkpoints (an exact resume needs no teacher path).
The teacher runs deterministically under ``stop_gradient``. Its weights are loaded by
:func:`initialize` on a fresh start (Orbax partial restore straight into the target
shardings, via research/finetune/init.py's helpers).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from research.config import ConfigError


class TeacherParam(nnx.Variable):
  """A frozen teacher weight: in the model state, never in the optimizer's ``wrt``."""


# --------------------------------------------------------------------------- loss


def soft_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float
            ) -> jax.Array:
  """``KL(softmax(t/T) || softmax(s/T))`` over the last axis, float32, per position."""
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, hard_loss: jax.Array,
                 weights: jax.Array, *, alpha: float, temperature: float
                 ) -> tuple[jax.Array, jax.Array]:
  """(mixed loss, mean KL): ``(1-alpha) hard + alpha T^2 mean_w KL``.

  ``weights`` has the logits' leading shape (the token or example mask); positions with
  weight 0 contribute nothing. The teacher's logits get no gradient.
  """
  kl = soft_kl(jax.lax.stop_gradient(teacher_logits), student_logits, temperature)
  w = weights.astype(jnp.float32)
  kl_mean = jnp.where(w > 0, kl * w, 0.0).sum() / jnp.maximum(w.sum(), 1.0)
  loss = (1.0 - alpha) * hard_loss + alpha * temperature ** 2 * kl_mean
  return loss, kl_mean


def _lm_forward(model, batch, deterministic):
  return model(batch['inputs'], deterministic=deterministic)


def _cls_forward(model, batch, deterministic):
  return model(batch['inputs'], mask_BL=batch['input_mask'],
               deterministic=deterministic).astype(jnp.float32)


def distill_objective(base_objective: Callable, kind: str, alpha: float, temperature: float,
                      z_loss: float, model, batch, deterministic: bool, **kw):
  """The task's objective in evaluation; the mixed distillation loss in training."""
  if deterministic:
    return base_objective(model, batch, deterministic, **kw)
  teacher = model.teacher
  forward = _lm_forward if kind == 'lm' else _cls_forward
  t_logits = jax.lax.stop_gradient(forward(teacher, batch, True))
  s_logits = forward(model, batch, False)
  if kind == 'lm':
    from research.models import loss as loss_lib
    hard, aux0 = loss_lib.lm_loss(s_logits, batch['targets'], batch['mask'], z_loss)
    weights = batch['mask']
    aux = {'loss': aux0['ce'], 'z_loss': aux0['z_loss']}
  else:
    labels = batch['label'][:, 0].astype(jnp.int32)
    weights = batch['mask'][:, 0].astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, labels)
    hard = jnp.where(weights > 0, ce, 0.0).sum() / denom
    acc = jnp.where(weights > 0, (jnp.argmax(s_logits, -1) == labels).astype(jnp.float32),
                    0.0).sum() / denom
    aux = {'loss': hard, 'accuracy': acc}
  loss, kl = distill_loss(s_logits, t_logits, hard, weights, alpha=alpha,
                          temperature=temperature)
  aux.update(distill_kl=kl, distill_loss=loss)
  return loss, aux


def make_objective(task, config: ml_collections.ConfigDict) -> Callable:
  import functools
  d = config.distill
  return functools.partial(distill_objective, task.objective, task.name, float(d.alpha),
                           float(d.temperature), float(config.loss.z_loss))


# --------------------------------------------------------------------------- teacher


def resolve_teacher(path: str, workdir: str) -> str:
  """``distill.teacher`` -> an absolute directory (relative: to workdir's parent)."""
  from research.checkpoint import resolve_run_dir
  return resolve_run_dir(path, workdir)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Resolves ``distill.teacher`` (in place) and trains it first if ``teacher_config``
  is set and the teacher run has not finished (file-locked, like finetune's pretraining).
  """
  from research.compress import distill_active, validate_compress_config
  validate_compress_config(config)
  if not distill_active(config):
    return
  d = config.distill
  d.teacher = resolve_teacher(d.teacher, workdir)
  if d.teacher_config:
    from research.finetune import init as ft_init
    proxy = ml_collections.ConfigDict({'finetune': {
        'pretrain_config': d.teacher_config, 'init_from': d.teacher, 'pretrain_overrides': ()}})
    ft_init.ensure_pretrained(proxy)
  if not os.path.isdir(d.teacher):
    raise ConfigError(f'distill.teacher={d.teacher!r} does not exist; train the teacher '
                      f'there first or set distill.teacher_config=FILE[:arg].')
  teacher_config(config)  # Fails now (before compiling) if the teacher does not fit.


def _is_hf(path: str) -> bool:
  from research.models import hf_import
  return hf_import.is_hf_checkpoint(path)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher's run config (today's schema), compression/quantization off, the
  student's mesh; checks vocabulary and task against the student."""
  from research.config import base_config
  path = config.distill.teacher
  if _is_hf(path):
    from research.models import hf_import
    tcfg = base_config()
    for k, v in hf_import.model_config(path).items():
      tcfg.model[k] = v
    tcfg.task = 'lm'
  else:
    from research.finetune.export import _run_config
    if not os.path.exists(os.path.join(path, 'config.json')):
      raise ConfigError(f'distill.teacher={path!r} has no config.json; point it at a '
                        f'training run\'s --workdir (or an HF checkpoint directory).')
    tcfg = _run_config(path)
  tcfg.distill.teacher, tcfg.distill.teacher_config = '', ''
  tcfg.prune.method = 'none'
  tcfg.quant.mode, tcfg.quant.init_from = 'none', ''
  tcfg.finetune.init_from, tcfg.finetune.pretrain_config = '', ''
  tcfg.model.dropout = 0.0
  tcfg.model.attention_impl = config.model.attention_impl
  tcfg.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  if tcfg.task != config.task:
    raise ConfigError(f'distill.teacher={path!r} is a task={tcfg.task!r} run but this run '
                      f'is task={config.task!r}; use a teacher of the same task.')
  if config.model.vocab_size and tcfg.model.vocab_size != config.model.vocab_size:
    raise ConfigError(
        f'distill.teacher has model.vocab_size={tcfg.model.vocab_size} but the student has '
        f'{config.model.vocab_size}; teacher and student need the same tokenizer.')
  return tcfg


def _freeze(module: nnx.Module) -> nnx.Module:
  """Turns every ``nnx.Param`` (LoRA ones included) of ``module`` into a TeacherParam."""
  for _, sub in nnx.iter_modules(module):
    for name, value in list(vars(sub).items()):
      if isinstance(value, nnx.Param):
        setattr(sub, name, TeacherParam(value.get_value(), **value.get_metadata()))
  return module


def build_teacher(config: ml_collections.ConfigDict) -> nnx.Module:
  """The teacher module (random weights; :func:`initialize` loads them), frozen."""
  from research.tasks import make_task
  tcfg = teacher_config(config)
  if _is_hf(config.distill.teacher):
    from research.models.transformer import Transformer
    model = Transformer(tcfg.model, rngs=nnx.Rngs(0))
  else:
    model = make_task(tcfg).build_model()
  return _freeze(model)


def build_with_teacher(build: Callable[[], nnx.Module], config: ml_collections.ConfigDict
                       ) -> nnx.Module:
  model = build()
  model.teacher = build_teacher(config)
  return model


def initialize(config: ml_collections.ConfigDict, ts, workdir: str):
  """Loads the teacher's weights into ``ts.state`` (fresh start); returns the state."""
  from research.finetune import init as ft_init
  path = config.distill.teacher
  flat = list(nnx.to_flat_state(ts.state))
  prefix = (0, 'teacher')
  teacher = [(p[2:], v) for p, v in flat if tuple(p[:2]) == prefix
             and isinstance(v, TeacherParam)]
  as_params = nnx.from_flat_state([(p, nnx.Param(v.get_value())) for p, v in teacher])
  if _is_hf(path):
    arrays, report = ft_init.restore_from_hf(path, teacher_config(config).model, as_params)
  else:
    arrays, report = ft_init.restore_from_checkpoint(path, config.distill.teacher_step,
                                                     as_params)
  names = ['/'.join(map(str, p)) for p, _ in teacher]
  missing = sorted(set(names) - set(arrays))
  if missing:
    raise ConfigError(f'distill.teacher={path!r} (step {report["step"]}) lacks teacher '
                      f'parameters {missing[:5]}; is it the run its config.json describes?')
  out = []
  for p, v in flat:
    if tuple(p[:2]) == prefix and isinstance(v, TeacherParam):
      v = v.replace(arrays['/'.join(map(str, p[2:]))])
    out.append((p, v))
  n = sum(int(a.size) for a in arrays.values())
  logging.info('distill: teacher %s (%s, step %s): %d tensors, %s parameters; alpha=%s T=%s',
               path, report['kind'], report['step'], len(arrays), f'{n:,}',
               config.distill.alpha, config.distill.temperature)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'teacher.json'), 'w') as f:
      json.dump({'teacher': path, 'kind': report['kind'], 'step': report['step'],
                 'teacher_params': n, 'alpha': config.distill.alpha,
                 'temperature': config.distill.temperature}, f, indent=2)
  return nnx.from_flat_state(out)


def teacher_params(model: nnx.Module) -> int:
  return sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, TeacherParam)))


__all__: list[Any] = ['TeacherParam', 'soft_kl', 'distill_loss', 'distill_objective',
                      'prepare', 'initialize', 'build_with_teacher', 'teacher_config']
