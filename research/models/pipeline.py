"""Pipeline parallelism over the ``stage`` mesh axis: GPipe and circular schedules.

With ``scan_layers`` the block parameters are stacked on a leading ``'layers'`` axis,
which the rules table maps to the ``stage`` mesh axis, so each stage's devices hold a
contiguous block of layers. :func:`run` reshapes the stack to
``[repeats, stages, layers_per_stage, ...]`` (layer ``l = (r * stages + s) * lps + j``)
and runs ``repeats * microbatches + stages - 1`` iterations. In each, every stage
applies its layers to its current micro-batch at once (``jax.vmap`` over the stage
dimension, ``spmd_axis_name='stage'``, so each device group computes only its own
stage), then the outputs move one stage on (``jnp.roll`` over the stage dimension,
which XLA lowers to a collective-permute). This is the idea of MaxText's
``layers/pipeline.py``, written for NNX from the description, not from its code.

Schedule (``w = t - s`` is the work item of stage ``s`` at iteration ``t``; it is
micro-batch ``w % M`` on repeat ``w // M``; outside ``[0, R*M)`` the stage idles on
garbage that is never read):

* **GPipe** (``repeats=1``): micro-batch ``m`` enters stage 0 at iteration ``m`` and
  leaves the last stage at ``m + S - 1``. Bubble: ``(S-1) / (M + S - 1)`` of the
  iterations.
* **Circular** (``repeats=R > 1``): stage ``s`` holds the layer chunks
  ``r * S + s`` for ``r < R`` (each ``layers / (S*R)`` layers), and a micro-batch
  goes round the ring ``R`` times. Bubble: ``(S-1) / (R*M + S - 1)``, for the same
  per-iteration work ``1/R`` as large. Needs ``M >= S``: the last stage's output of
  micro-batch ``m`` is back at stage 0 after ``S`` iterations and is needed after
  ``M``; with ``M > S`` stage 0 keeps it in a buffer for ``M - S`` iterations.
  The parameters stay stored in layer order (checkpoints are the same with and
  without a pipeline), so the circular layout is one permutation of the block
  weights over the ``stage`` axis per step (and of their gradients back); GPipe
  moves no weights.

Memory: every iteration is rematerialised for the backward pass except each layer's
input (``jax.checkpoint`` with ``save_only_these_names``, or-ed with the model's
``remat`` policy), as MaxText does; otherwise the backward pass would keep a copy of
the stage's weights per iteration (circular) and the bubble's garbage activations.

The embedding, final norm, logits and loss stay outside the pipeline: they run
replicated over ``stage`` (each stage group computes them for its data shards).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

STAGE_AXIS = 'stage'
LAYER_INPUT = 'pipeline_layer_input'  # checkpoint_name of each layer's input (saved).
SCHEDULES = ('gpipe', 'circular')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A resolved pipeline schedule: ``stages`` x ``microbatches`` x ``repeats``."""
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def iterations(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """Share of stage-iterations that compute nothing useful."""
    return (self.stages - 1) / self.iterations


def resolve(stages: int, *, num_layers: int, microbatches: int = 0,
            schedule: str = 'gpipe', repeats: int = 0) -> Schedule:
  """The schedule the ``model.pipeline_*`` keys ask for on ``stages`` stages.

  ``microbatches`` 0 means ``stages``; ``repeats`` 0 means 1 for ``'gpipe'`` and
  ``num_layers / stages`` for ``'circular'`` (one layer per stage visit: the smallest
  bubble).
  """
  if not repeats:
    repeats = 1 if schedule == 'gpipe' else max(num_layers // stages, 1)
  return Schedule(stages=stages, microbatches=int(microbatches) or stages,
                  repeats=int(repeats))


def resolve_config(model_cfg, stages: int) -> Schedule:
  """:func:`resolve` from a config's ``model`` section."""
  return resolve(stages, num_layers=model_cfg.num_layers,
                 microbatches=model_cfg.get('pipeline_microbatches', 0),
                 schedule=model_cfg.get('pipeline_schedule', 'gpipe'),
                 repeats=model_cfg.get('pipeline_repeats', 0))


def active_stages() -> int:
  """Size of the ``stage`` axis of the mesh in use (1 without a mesh or the axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or STAGE_AXIS not in mesh.axis_names:
    return 1
  return int(dict(mesh.shape)[STAGE_AXIS])


def _constrain(x: jax.Array, spec: P) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or STAGE_AXIS not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def _stage_spec(x: jax.Array, dim: int = 0) -> P:
  """``stage`` on ``dim``, every other dimension left to XLA's propagation."""
  return P(*[STAGE_AXIS if i == dim else P.UNCONSTRAINED for i in range(x.ndim)])


def _to_microbatches(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], micro-batch i = rows i, i+M, ... (stays shard-local)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _from_microbatches(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def run(stage_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]], layer_tree: Any,
        x_BLD: jax.Array, batch_tree: Any, schedule: Schedule, *,
        remat_policy: Callable[..., bool] | None = None,
        activation_spec: P | None = None) -> tuple[jax.Array, Any]:
  """Applies all layers to ``x_BLD`` through the pipeline.

  Returns ``(x_BLD, aux)``: the last layer's output ``[B, L, D]``, and ``stage_fn``'s
  auxiliary values summed over every (layer block, micro-batch) that did real work
  (bubble iterations excluded); divide by ``num_layers * microbatches`` for a mean.

  Args:
    stage_fn: ``(layers, x_bLD, batch) -> (x_bLD, aux)`` applying a stack of
      consecutive layers (leaves of ``layers`` have a leading ``layers_per_stage``
      axis) to one micro-batch; ``batch`` is ``batch_tree`` for that micro-batch;
      ``aux`` a pytree of float scalars summed over those layers (e.g. MoE losses;
      ``{}`` for none). It should pass each layer's input through
      ``checkpoint_name(x, LAYER_INPUT)``.
    layer_tree: arrays with a leading ``num_layers`` axis (block parameters, per-layer
      windows), in layer order.
    x_BLD: the residual stream entering the first layer.
    batch_tree: arrays with a leading batch axis ``B`` (RoPE tables, masks, segment
      ids), split into micro-batches like ``x_BLD``; None leaves stay None.
    schedule: stages (= the mesh's ``stage`` size), micro-batches, repeats.
    remat_policy: the model's ``jax.checkpoint`` policy, or-ed with saving the layer
      inputs (None: only the layer inputs are saved).
    activation_spec: PartitionSpec of one micro-batch's ``[b, L, D]`` activations
      (from the logical rules); the stage dimension is put in front of it.
  """
  S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
  B = x_BLD.shape[0]
  num_layers = jax.tree.leaves(layer_tree)[0].shape[0]
  if num_layers % (S * R) or B % M or (R > 1 and M < S):
    raise ValueError(f'pipeline: {num_layers} layers, batch {B} and {schedule} do not fit '
                     f'(validation should have refused this config).')
  lps = num_layers // (S * R)
  act = activation_spec if activation_spec is not None else P(
      *([P.UNCONSTRAINED] * x_BLD.ndim))
  stage_act = P(STAGE_AXIS, *act)  # [S, b, L, D]
  buffer_act = P(STAGE_AXIS, None, *act)  # [S, M, b, L, D]

  def split_layers(a):  # [L, ...] -> [R, S, lps, ...]: layer (r*S + s)*lps + j.
    a = a.reshape((R, S, lps) + a.shape[1:])
    return _constrain(a, _stage_spec(a, 1))

  layers = jax.tree.map(split_layers, layer_tree)
  x_MbLD = _constrain(_to_microbatches(x_BLD, M), P(None, *act))
  batch_M = jax.tree.map(lambda a: _to_microbatches(a, M), batch_tree)
  stage_ids = jnp.arange(S, dtype=jnp.int32)
  per_stage = lambda v, ndim: v.reshape((S,) + (1,) * (ndim - 1))  # [S] -> broadcastable.

  def one_stage(stage_layers, r, m, x_bLD):
    # stage_layers: leaves [R, lps, ...] of this stage; r, m: its repeat and micro-batch.
    here = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False),
                        stage_layers)
    batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False),
                         batch_M)
    return stage_fn(here, x_bLD, batch)

  policy = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT)
  if remat_policy is not None:
    policy = jax.checkpoint_policies.save_from_both_policies(remat_policy, policy)

  def all_stages(layers, r_S, m_S, x_SbLD):
    return jax.vmap(one_stage, in_axes=(1, 0, 0, 0), spmd_axis_name=STAGE_AXIS)(
        layers, r_S, m_S, x_SbLD)
  all_stages = jax.checkpoint(all_stages, policy=policy, prevent_cse=False)

  def body(carry, t):
    shift, circ, out, aux_sum = carry
    # Stage s takes stage s-1's last output; stage 0 the last stage's (a ring).
    rolled = _constrain(jnp.roll(shift, 1, axis=0), stage_act)
    first = per_stage(stage_ids == 0, rolled.ndim)
    base = rolled
    if circ is not None:  # Circular with M > S: stage 0 reads what arrived M - S ago.
      base = jnp.where(first, jax.lax.dynamic_index_in_dim(circ, t % M, 1, keepdims=False),
                       rolled)
      circ = jax.lax.dynamic_update_index_in_dim(circ, rolled, (t - S) % M, 1)
    fresh = jax.lax.dynamic_index_in_dim(x_MbLD, t % M, 0, keepdims=False)
    inputs = _constrain(jnp.where(first & (t < M), fresh[None], base), stage_act)
    w = t - stage_ids  # Work item of each stage: micro-batch w % M on repeat w // M.
    new, aux = all_stages(layers, jnp.clip(w // M, 0, R - 1), w % M, inputs)
    new = _constrain(new, stage_act)
    real = (w >= 0) & (w < R * M)  # Bubble iterations' aux are dropped.
    aux_sum = jax.tree.map(
        lambda acc, a: acc + jnp.sum(jnp.where(per_stage(real, a.ndim), a, 0), axis=0),
        aux_sum, aux)
    # The last stage finished micro-batch (t - S + 1) % M; every stage writes its output
    # at that index of its own row (local), and only the last row is read at the end.
    out = jax.lax.dynamic_update_index_in_dim(out, new, (t - S + 1) % M, 1)
    return (new, circ, out, aux_sum), None

  zeros = lambda shape, spec: _constrain(jnp.zeros(shape, x_BLD.dtype), spec)
  shift = zeros((S,) + x_MbLD.shape[1:], stage_act)
  out = zeros((S,) + x_MbLD.shape, buffer_act)
  circ = zeros((S,) + x_MbLD.shape, buffer_act) if R > 1 and M > S else None
  aux_shapes = jax.eval_shape(
      all_stages, layers, stage_ids, stage_ids, jax.ShapeDtypeStruct(shift.shape, shift.dtype))[1]
  aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), aux_shapes)
  (_, _, out, aux), _ = jax.lax.scan(body, (shift, circ, out, aux0),
                                     jnp.arange(schedule.iterations, dtype=jnp.int32))
  # The last stage's row, replicated over 'stage' (a masked sum: one all-reduce).
  last = per_stage(stage_ids == S - 1, out.ndim)
  out_MbLD = jnp.sum(jnp.where(last, out, jnp.zeros((), out.dtype)), axis=0)
  return _from_microbatches(_constrain(out_MbLD, P(None, *act))), aux
