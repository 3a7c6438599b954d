"""The jitted train and eval steps: the one builder that train, plan and benchmark use.

The train step is a pure function of (state, batch) with explicit shardings and the
state donated. Everything a run's step does is decided here from the config and the
composed task (gradient accumulation, NaN policy, fault injection, a wrapper's
``post_update``), so ``launch.plan`` and ``launch.benchmark`` compile exactly the
function the trainer runs.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from research import sharding as shd
from research.optim import path_str
from research.tasks import Task


def _micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, ... (stays shard-local)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _inject_nan(grads, step, at_step: int, regex: str):
  """Fault injection for tests: NaN gradients at ``at_step`` for matching params."""
  rx = re.compile(regex) if regex else None

  def leaf(path, g):
    if rx is not None and not rx.search(path_str(path)):
      return g
    return jnp.where(step == at_step, jnp.full_like(g, jnp.nan), g)

  return jax.tree_util.tree_map_with_path(leaf, grads)


def _nonfinite_report(loss, grads):
  """Whether the update is finite, and one flag per parameter (for the error report)."""
  flags = jax.tree.map(lambda g: jnp.logical_not(jnp.all(jnp.isfinite(g))), grads)
  finite = jnp.isfinite(loss) & jnp.logical_not(
      jnp.any(jnp.stack([f for f in jax.tree.leaves(flags)])))
  return finite, flags


def train_step(graphdef, state, batch, *, objective: Callable, accum_steps: int,
               wrt: Any = nnx.Param, nan_policy: str = 'stop', inject_nan_at_step: int = 0,
               inject_nan_regex: str = '', post_update: Callable | None = None):
  """One optimizer update, with gradients accumulated over ``accum_steps`` micro-batches.

  Each micro-batch's mean loss is weighted by its share of the batch's real tokens, so
  the accumulated gradient equals the full-batch gradient (not an average of means).
  With ``nan_policy='skip'`` a non-finite loss or gradient leaves the state unchanged
  (``skipped`` = 1 in the metrics); with 'stop' the host stops on the flag.
  """
  model, optimizer = nnx.merge(graphdef, state, copy=True)  # Keep `state` for 'skip'.
  gdef_m, params, rest = nnx.split(model, wrt, ...)
  total_tokens = jnp.maximum(batch['mask'].sum(), 1.0)

  def weighted_loss(params, rest, micro):
    m = nnx.merge(gdef_m, params, rest, copy=True)
    loss, aux = objective(m, micro, deterministic=False)
    weight = micro['mask'].sum() / total_tokens
    _, _, new_rest = nnx.split(m, wrt, ...)
    return loss * weight, (jax.tree.map(lambda a: a * weight, aux), new_rest)

  grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
  if accum_steps == 1:
    (loss, (aux, rest)), grads = grad_fn(params, rest, batch)
  else:
    def body(carry, micro):
      g_acc, l_acc, a_acc, rest = carry
      (l, (a, rest)), g = grad_fn(params, rest, micro)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
              jax.tree.map(jnp.add, a_acc, a), rest), None
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    micro = _micro_batches(batch, accum_steps)
    aux_shapes = jax.eval_shape(
        lambda: grad_fn(params, rest, jax.tree.map(lambda x: x[0], micro))[0][1][0])
    zeros_a = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shapes)
    (grads, loss, aux, rest), _ = jax.lax.scan(
        body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a, rest), micro)
  if inject_nan_at_step:
    grads = _inject_nan(grads, optimizer.step[...] + 1, inject_nan_at_step, inject_nan_regex)
  finite, nonfinite = _nonfinite_report(loss, grads)
  nnx.update(model, rest)
  optimizer.update(model, grads)
  if post_update is not None:  # E.g. pruning masks (research/compress/prune.py).
    post_update(model, optimizer.step[...])
  new_state = nnx.state((model, optimizer))
  if nan_policy == 'skip':
    # Keep the old params/optimizer moments, but let the step counter advance so it
    # stays equal to the host's step (schedules, ramps and fault injection rely on it).
    step_counter = new_state[1]['step']
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state[1]['step'] = step_counter
  out = {**aux, 'total_loss': loss, 'grad_norm': optax.tree.norm(grads),
         'weight': total_tokens, 'skipped': 1 - finite.astype(jnp.int32),
         'nonfinite': nonfinite}
  return new_state, out


def eval_step(graphdef, state, batch, *, objective: Callable):
  """Sums (aux mean x weight) over one batch, deterministic; divide by 'weight' later."""
  model, _ = nnx.merge(graphdef, state)
  _, aux = objective(model, batch, deterministic=True)
  weight = batch['mask'].sum()
  return {**jax.tree.map(lambda a: a * weight, aux), 'weight': weight}


def batch_sharding(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """Where a global batch lives: rows over the data shards, columns over 'sequence'."""
  return shd.named(mesh, ('batch', 'seq'), shd.rules_from_config(config.mesh))


def make_train_step(config: ml_collections.ConfigDict, task: Task, ts, batch_sharding_):
  """The jitted train step of ``config``'s run: ``(state, batch) -> (state, metrics)``."""
  return jax.jit(
      functools.partial(train_step, ts.graphdef, objective=task.objective,
                        accum_steps=config.optimizer.grad_accum_steps, wrt=task.trainable,
                        nan_policy=config.nan_policy,
                        inject_nan_at_step=config.debug.inject_nan_at_step,
                        inject_nan_regex=config.debug.inject_nan_regex,
                        post_update=task.post_update),
      in_shardings=(ts.shardings, batch_sharding_), out_shardings=(ts.shardings, None),
      donate_argnums=(0,))


def make_eval_step(task: Task, graphdef, state_shardings, batch_sharding_):
  """The jitted eval step: ``(state, batch) -> summed metrics`` (see :func:`eval_step`)."""
  return jax.jit(functools.partial(eval_step, graphdef, objective=task.objective),
                 in_shardings=(state_shardings, batch_sharding_))
