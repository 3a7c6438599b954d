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
shardings, :func:`research.runs.restore_params`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from research import runs
from research.config import ConfigError, base_config


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


def distill_loss_fn(base_loss: Callable, base_forward: Callable, weights: Callable,
                    alpha: float, temperature: float, model, outputs, batch,
                    deterministic: bool):
  """The task's loss in evaluation; in training the task's loss mixed with the KL to the
  teacher's logits (``model.teacher`` run deterministically by the task's forward)."""
  hard, aux = base_loss(model, outputs, batch, deterministic)
  if deterministic:
    return hard, aux
  t_logits = jax.lax.stop_gradient(base_forward(model.teacher, batch, True))
  loss, kl = distill_loss(outputs, t_logits, hard, weights(batch), alpha=alpha,
                          temperature=temperature)
  return loss, {**aux, 'distill_kl': kl, 'distill_loss': loss}


# --------------------------------------------------------------------------- teacher


NAME = 'distill'


def prepare(config: ml_collections.ConfigDict, workdir: str | None, ctx) -> None:
  """Resolves ``distill.teacher`` (in place; relative: to the workdir's parent), trains
  it first if ``teacher_config`` is set and the teacher has not finished, and checks the
  teacher fits the student (before anything is compiled)."""
  d = config.distill
  d.teacher = runs.resolve(d.teacher, workdir)
  ctx.ensure_trained(d.teacher, d.teacher_config, (), 'distill.teacher_config')
  if not os.path.isdir(d.teacher):
    raise ConfigError(f'distill.teacher={d.teacher!r} does not exist; train the teacher '
                      f'there first or set distill.teacher_config=FILE[:arg].')
  teacher_config(config)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The teacher's run config (today's schema), compression/quantization off, the
  student's mesh; checks vocabulary and task against the student."""
  path = config.distill.teacher
  if runs.is_hf_dir(path):
    from research.models import hf_import
    tcfg = base_config()
    for k, v in hf_import.model_config(path).items():
      tcfg.model[k] = v
    tcfg.task = 'lm'
  else:
    if not runs.is_run_dir(path):
      raise ConfigError(f'distill.teacher={path!r} has no config.json of a run; point it '
                        f'at a training run\'s --workdir (or an HF checkpoint directory).')
    tcfg = runs.read_config(path)
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


def build_teacher(config: ml_collections.ConfigDict, compose: Callable) -> nnx.Module:
  """The teacher module (random weights; :func:`initialize` loads them), frozen.

  ``compose(config) -> Task`` is the recipe's composition, so a teacher is built as its
  own run built it (LoRA modules included).
  """
  tcfg = teacher_config(config)
  if runs.is_hf_dir(config.distill.teacher):
    from research.models.transformer import Transformer
    model = Transformer(tcfg.model, rngs=nnx.Rngs(0))
  else:
    model = compose(tcfg).build_model()
  return _freeze(model)


def build_with_teacher(build: Callable[[], nnx.Module], config: ml_collections.ConfigDict,
                       compose: Callable) -> nnx.Module:
  model = build()
  model.teacher = build_teacher(config, compose)
  return model


def wrap(task, config: ml_collections.ConfigDict, ctx):
  """The student's task with the teacher in its model and the mixed loss in training."""
  d = config.distill
  loss = functools.partial(distill_loss_fn, task.loss, task.forward, task.weights,
                           float(d.alpha), float(d.temperature))
  return task.wrapped(
      NAME, loss=loss,
      build_model=functools.partial(build_with_teacher, task.build_model, config, ctx.compose),
      initialize=task.then_initialize(functools.partial(initialize, config)))


def initialize(config: ml_collections.ConfigDict, ts, workdir: str):
  """Loads the teacher's weights into ``ts.state`` (fresh start); returns the state."""
  path = config.distill.teacher
  flat = list(nnx.to_flat_state(ts.state))
  prefix = (0, 'teacher')
  teacher = [(p[2:], v) for p, v in flat if tuple(p[:2]) == prefix
             and isinstance(v, TeacherParam)]
  as_params = nnx.from_flat_state([(p, nnx.Param(v.get_value())) for p, v in teacher])
  if runs.is_hf_dir(path):
    arrays, report = runs.restore_hf_params(path, teacher_config(config).model, as_params)
  else:
    arrays, report = runs.restore_params(path, config.distill.teacher_step, as_params,
                                         what='distill.teacher')
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


