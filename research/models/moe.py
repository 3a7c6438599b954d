"""Mixture-of-experts feed-forward layer: top-k routing over ``E`` expert MLPs.

Each token's router logits (float32, ``x @ router``) pick its ``top_k`` experts; the
layer's output is the routing-weighted sum of those experts' MLP outputs (SwiGLU or
GELU, like the dense :class:`research.models.layers.MLP`). Two ways to run the experts:

* **dropless** (``capacity_factor == 0``, the default): the (token, expert) pairs are
  sorted by expert and every expert multiplies exactly its rows with a grouped matmul,
  ``jax.lax.ragged_dot_general`` (one matmul over all experts whose row groups have
  data-dependent sizes). No token is ever dropped. TPUs run it natively; XLA:CPU lowers
  it to a dense matmul over all groups with masks (E times the FLOPs: measured in
  README "Mixture of experts").
* **capacity factor** ``cf > 0`` (GShard/Switch): each expert takes at most
  ``C = ceil(cf * T * top_k / E)`` of a device's ``T`` tokens into a fixed ``[E, C, D]``
  buffer (first choices have priority over second choices, then token order); the rest
  of its pairs are dropped (they contribute zero; the residual stream carries the token
  on). Fixed shapes, batched matmuls; ``cf >= E / top_k`` never drops and equals
  dropless up to float rounding.

Expert parallelism: the expert weights are split over the mesh axes of the logical
``'exp'`` axis (``mesh.expert``), the batch is split over it too (like MaxText:
non-expert layers treat it as data parallelism). Inside a ``jax.shard_map`` each device
routes its own tokens, an ``all_to_all`` over ``'expert'`` sends every pair to the
device holding its expert, the experts run there, and a second ``all_to_all`` brings
the results back. Dropless sends a fixed-size buffer of all of the device's pairs to
every expert shard (worst case: all of them go to one shard), so nothing can be
dropped; capacity mode sends the ``[E, C, D]`` buffer. FSDP: the expert weights are
all-gathered over their ``'embed'`` axis before the map (as every FSDP layer is);
tensor parallelism: each device holds a slice of every expert's hidden width and the
expert outputs are summed over ``'tensor'`` (``psum``). Capacity is per device (the
tokens one device routes), so with drops the result depends on the mesh; dropless
does not.

Auxiliary losses (float32 scalars over the whole batch, returned to the caller):
``moe_lb_loss`` Switch's load balance ``E * sum_e f_e P_e`` (``f_e`` the fraction of
(token, choice) pairs routed to ``e``, ``P_e`` its mean router probability; 1.0 when
perfectly balanced) and ``moe_z_loss`` ST-MoE's router z-loss ``mean(logsumexp^2)``;
also ``moe_drop_fraction`` (0 when dropless). The task weighs them
(``model.moe_lb_loss``, ``model.moe_z_loss``).

Parameters (``E`` experts, ``F`` expert width; under ``scan_layers`` with a leading
``'layers'`` axis)::

  moe/router/kernel   [D, E]     ('embed', None)        float32 logits
  moe/wi_0, moe/wi_1  [E, D, F]  ('exp', 'embed', 'mlp')  swiglu (gelu: moe/wi)
  moe/wo              [E, F, D]  ('exp', 'mlp', 'embed')

QAT: qwix's QAT provider intercepts ``jax.lax.ragged_dot``, but with one scale per
output channel shared by all experts, without groups/per-tensor/asymmetric settings,
and (inside the shard_map) over each device's shard, so the scales would depend on the
mesh. The layer therefore calls ``ragged_dot_general`` (not intercepted) and takes an
optional ``quantizer`` (set by research/quant/qat.py) that fake-quantizes each expert's
weights with the run's ``quant`` settings, before the map (mesh-independent), with a
straight-through gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from research.models.layers import normal_init
from research.sharding import logical_to_mesh_spec

AUX_KEYS = ('moe_lb_loss', 'moe_z_loss', 'moe_drop_fraction')

# [M, K] rows grouped along M x [G, K, N] -> [M, N]: jax.lax.ragged_dot's own layout.
_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (1,)), ((), ())),
    lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, 'a' or ('a', 'b')) as a tuple of mesh axis names."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


# --------------------------------------------------------------------------- routing


def route(logits_TE: jax.Array, top_k: int, norm_topk: bool
          ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """``(weights [..., k] float32, expert ids [..., k] int32, aux losses)``.

  ``logits`` float32 ``[..., E]``. The aux losses are means over all leading axes.
  """
  num_experts = logits_TE.shape[-1]
  probs = jax.nn.softmax(logits_TE, axis=-1)
  top_p, idx = jax.lax.top_k(probs, top_k)
  if norm_topk:
    top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
  lead = tuple(range(logits_TE.ndim - 1))
  chosen = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=-2)  # [..., E]
  f_e = jnp.mean(chosen, axis=lead) / top_k  # Fraction of (token, choice) pairs.
  p_e = jnp.mean(probs, axis=lead)
  aux = {'moe_lb_loss': num_experts * jnp.sum(f_e * p_e),
         'moe_z_loss': jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))}
  return top_p, idx.astype(jnp.int32), aux


def _sort_by_expert(idx_TK: jax.Array, num_experts: int):
  """(order, expert of each sorted pair, token of each sorted pair, pairs per expert).

  Pairs are numbered choice-major (all first choices, then all second choices...), so a
  stable sort gives first choices priority when a capacity drops pairs.
  """
  T = idx_TK.shape[0]
  flat = idx_TK.T.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, flat[order], order % T, sizes


# --------------------------------------------------------------------------- experts


def _act(kind: str, h0: jax.Array, h1: jax.Array | None) -> jax.Array:
  if kind == 'swiglu':
    return jax.nn.silu(h0) * h1
  return jax.nn.gelu(h0, approximate=True)


def _grouped_mlp(x_MD, sizes_G, w: dict[str, jax.Array], kind: str, quantizer
                 ) -> jax.Array:
  """Rows grouped by expert (``sizes_G`` rows each, then padding) through their MLPs."""
  def mm(a, b):
    if quantizer is not None and quantizer.act_bits:
      a = quantizer.activation(a)
    return jax.lax.ragged_dot_general(a, b, sizes_G, _RAGGED)

  if kind == 'swiglu':
    h = _act(kind, mm(x_MD, w['wi_0']), mm(x_MD, w['wi_1']))
  else:
    h = _act(kind, mm(x_MD, w['wi']), None)
  return mm(h, w['wo'])


def _batched_mlp(x_ECD, w: dict[str, jax.Array], kind: str, quantizer) -> jax.Array:
  """A fixed ``[E, C, D]`` buffer through each expert's MLP (capacity mode)."""
  def mm(a, b):
    if quantizer is not None and quantizer.act_bits:
      a = quantizer.activation(a)
    return jnp.einsum('ecd,edf->ecf', a, b)

  if kind == 'swiglu':
    h = _act(kind, mm(x_ECD, w['wi_0']), mm(x_ECD, w['wi_1']))
  else:
    h = _act(kind, mm(x_ECD, w['wi']), None)
  return mm(h, w['wo'])


def _psum(y, axes: tuple[str, ...]):
  return jax.lax.psum(y, axes) if axes else y


def _experts_local(x_TD, idx_TK, w_TK, w: dict[str, jax.Array], *, num_experts: int,
                   kind: str, capacity_factor: float, ep_axes: tuple[str, ...], ep: int,
                   tp_axes: tuple[str, ...], quantizer):
  """One device's tokens through their experts: ``(y [T, D], dropped pairs [1])``.

  ``w`` holds this device's experts (``E / ep`` of them) and its slice of their width.
  """
  T, D = x_TD.shape
  K = idx_TK.shape[1]
  KT = K * T
  order, sorted_e, token, sizes = _sort_by_expert(idx_TK, num_experts)
  x_sorted = x_TD[token]  # [KT, D], grouped by expert.
  dropped = jnp.zeros((1,), jnp.int32)
  if capacity_factor > 0:
    C = max(1, min(T, math.ceil(capacity_factor * T * K / num_experts)))
    start = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(KT, dtype=jnp.int32) - start[sorted_e]
    keep = rank < C
    slot = jnp.where(keep, rank, C)  # Out of range: the scatter drops it.
    buf = jnp.zeros((num_experts, C, D), x_TD.dtype).at[sorted_e, slot].set(
        x_sorted, mode='drop')
    if ep > 1:  # [E, C, D] -> [E/ep, ep*C, D]: my experts' slots from every device.
      buf = jax.lax.all_to_all(buf, ep_axes, 0, 1, tiled=True)
    y = _psum(_batched_mlp(buf, w, kind, quantizer), tp_axes)
    if ep > 1:
      y = jax.lax.all_to_all(y, ep_axes, 1, 0, tiled=True)
    y_sorted = y.at[sorted_e, slot].get(mode='fill', fill_value=0)
    dropped = jnp.sum(~keep).astype(jnp.int32)[None]
  elif ep == 1:
    y_sorted = _psum(_grouped_mlp(x_sorted, sizes, w, kind, quantizer), tp_axes)
  else:
    local = num_experts // ep
    counts = sizes.reshape(ep, local)  # Pairs for each (expert shard, its local expert).
    per_shard = counts.sum(1)
    shard = sorted_e // local
    pos = jnp.arange(KT, dtype=jnp.int32) - (jnp.cumsum(per_shard) - per_shard)[shard]
    # Room for all KT pairs towards every shard: dropless whatever the routing.
    send = jnp.zeros((ep, KT, D), x_TD.dtype).at[shard, pos].set(x_sorted, unique_indices=True)
    recv = jax.lax.all_to_all(send.reshape(ep * KT, D), ep_axes, 0, 0, tiled=True)
    recv_counts = jax.lax.all_to_all(counts, ep_axes, 0, 0, tiled=True)  # [source, local]
    ends = jnp.cumsum(recv_counts, axis=1)
    row = jnp.arange(KT, dtype=jnp.int32)
    row_expert = jnp.sum(row[None, None, :] >= ends[:, :, None], axis=1)  # local == padding
    order2 = jnp.argsort(row_expert.reshape(-1), stable=True)
    x_recv = recv[order2]
    y_recv = _psum(_grouped_mlp(x_recv, recv_counts.sum(0), w, kind, quantizer), tp_axes)
    valid = jnp.arange(ep * KT) < jnp.sum(recv_counts)
    y_recv = jnp.where(valid[:, None], y_recv, 0)
    y_back = jnp.zeros_like(y_recv).at[order2].set(y_recv, unique_indices=True)
    y_back = jax.lax.all_to_all(y_back, ep_axes, 0, 0, tiled=True).reshape(ep, KT, D)
    y_sorted = y_back[shard, pos]
  y_KT = jnp.zeros((KT, D), y_sorted.dtype).at[order].set(y_sorted, unique_indices=True)
  y_TD = jnp.einsum('ktd,tk->td', y_KT.reshape(K, T, D).astype(jnp.float32), w_TK)
  return y_TD.astype(x_TD.dtype), dropped


# --------------------------------------------------------------------------- module


class MoE(nnx.Module):
  """Top-k routed experts; ``__call__(x [B, L, D]) -> (y [B, L, D], aux losses)``."""

  def __init__(self, d_model: int, num_experts: int, top_k: int, expert_dim: int, *,
               kind: str, capacity_factor: float, norm_topk: bool, init_std: float,
               out_init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    if kind not in ('swiglu', 'gelu'):
      raise ValueError(f'unknown mlp_kind {kind!r}; use swiglu or gelu.')
    self.num_experts, self.top_k = int(num_experts), int(top_k)
    self.kind = kind
    self.capacity_factor = float(capacity_factor)
    self.norm_topk = bool(norm_topk)
    self.dtype = dtype
    self.router = nnx.Linear(d_model, num_experts, use_bias=False, dtype=jnp.float32,
                             param_dtype=param_dtype,
                             kernel_init=normal_init(init_std, ('embed', None)), rngs=rngs)
    shape_in, shape_out = (num_experts, d_model, expert_dim), (num_experts, expert_dim, d_model)
    w_in = normal_init(init_std, ('exp', 'embed', 'mlp'))
    names = ('wi_0', 'wi_1') if kind == 'swiglu' else ('wi',)
    for name in names:
      setattr(self, name, nnx.Param(w_in(rngs.params(), shape_in, param_dtype)))
    self.wo = nnx.Param(normal_init(out_init_std, ('exp', 'mlp', 'embed'))(
        rngs.params(), shape_out, param_dtype))
    # Set by research/quant/qat.py: fake-quantizes expert weights (and activations).
    self.quantizer = None

  def expert_weights(self) -> dict[str, jax.Array]:
    """The experts' kernels in the compute dtype (fake-quantized under QAT)."""
    names = ('wi_0', 'wi_1', 'wo') if self.kind == 'swiglu' else ('wi', 'wo')
    out = {}
    for name in names:
      w = getattr(self, name)[...]
      if self.quantizer is not None:
        w = self.quantizer.weight(w, name, contraction_axis=1)  # Contracts axis 1.
      out[name] = w.astype(self.dtype)
    return out

  def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    B, L, _ = x_BLD.shape
    logits_BLE = self.router(x_BLD.astype(jnp.float32))
    w_BLK, idx_BLK, aux = route(logits_BLE, self.top_k, self.norm_topk)
    y_BLD, dropped = self._dispatch(x_BLD.astype(self.dtype), idx_BLK, w_BLK,
                                    self.expert_weights())
    aux['moe_drop_fraction'] = jnp.sum(dropped).astype(jnp.float32) / (B * L * self.top_k)
    return y_BLD, aux

  def _dispatch(self, x_BLD, idx_BLK, w_BLK, w: dict[str, jax.Array]):
    kwargs = dict(num_experts=self.num_experts, kind=self.kind,
                  capacity_factor=self.capacity_factor, quantizer=self.quantizer)
    B, L, D = x_BLD.shape

    def local(x, idx, wts, weights, ep_axes=(), ep=1, tp_axes=()):
      b, l = x.shape[:2]
      y, dropped = _experts_local(x.reshape(b * l, D), idx.reshape(b * l, -1),
                                  wts.reshape(b * l, -1), weights, ep_axes=ep_axes, ep=ep,
                                  tp_axes=tp_axes, **kwargs)
      return y.reshape(b, l, D), dropped

    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
      return local(x_BLD, idx_BLK, w_BLK, w)
    # Only mesh axes of size > 1 go into the specs: nothing varies over the others.
    live = lambda names: tuple(a for a in _axes(logical_to_mesh_spec(names, rules)[0])
                               if mesh.shape[a] > 1)
    b_axes, s_axes = live(('batch',)), live(('seq',))
    ep_axes, tp_axes = live(('exp',)), live(('mlp',))
    entry = lambda axes: axes or None
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    ep = size(ep_axes)
    if B % size(b_axes) or L % size(s_axes):
      # A batch the token shards do not divide (decoding a few samples): every device
      # routes the whole batch and the compiler places the experts' matmuls.
      return local(x_BLD, idx_BLK, w_BLK, w)
    if not set(ep_axes) <= set(b_axes):
      raise ValueError(f"mesh.rules: the experts' mesh axes {ep_axes} must also split the "
                       f"batch (logical 'batch' -> {b_axes}); keep 'expert' in 'batch'.")
    if set(tp_axes) & set(b_axes + s_axes):
      raise ValueError(f"mesh.rules: the experts' hidden width ('mlp' -> {tp_axes}) cannot "
                       f"be split over a mesh axis that splits the tokens {b_axes + s_axes}.")
    x_spec = P(entry(b_axes), entry(s_axes), None)
    w_specs = {name: (P(entry(ep_axes), entry(tp_axes), None) if name == 'wo'
                      else P(entry(ep_axes), None, entry(tp_axes))) for name in w}
    drop_spec = P(entry(b_axes + s_axes))
    fn = jax.shard_map(
        lambda x, idx, wts, weights: local(x, idx, wts, weights, ep_axes, ep, tp_axes),
        mesh=mesh, in_specs=(x_spec, x_spec, x_spec, w_specs), out_specs=(x_spec, drop_spec))
    return fn(x_BLD, idx_BLK, w_BLK, w)


# --------------------------------------------------------------------------- reference


def reference_moe(x_TD: jax.Array, router_DE: jax.Array, w: dict[str, jax.Array], *,
                  top_k: int, kind: str, norm_topk: bool = True) -> jax.Array:
  """Naive per-token MoE (every expert on every token, masked by the routing weights).

  For tests: what :class:`MoE` must equal (dropless) without sorting, grouping or
  collectives.
  """
  logits = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
  weights, idx, _ = route(logits, top_k, norm_topk)
  num_experts = router_DE.shape[1]
  gate_TE = jnp.sum(jax.nn.one_hot(idx, num_experts) * weights[..., None], axis=1)
  out = jnp.zeros(x_TD.shape, jnp.float32)
  for e in range(num_experts):
    if kind == 'swiglu':
      h = jax.nn.silu(x_TD @ w['wi_0'][e]) * (x_TD @ w['wi_1'][e])
    else:
      h = jax.nn.gelu(x_TD @ w['wi'][e], approximate=True)
    out = out + gate_TE[:, e:e + 1] * (h @ w['wo'][e])
  return out
