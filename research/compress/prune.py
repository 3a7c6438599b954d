"""Pruning with masks in the model state: magnitude (gradual), N:M, structured.

Every pruned kernel (a ``kernel`` of an ``nnx.Linear`` / ``nnx.Einsum`` whose module
path fullmatches ``prune.targets``; for ``structured``, every attention and MLP kernel)
gets a :class:`PruneMask` variable beside it (``.../query/prune_mask``), with the
kernel's shape and logical axes (so the same sharding). Masks are not ``nnx.Param``: the
optimizer ignores them, Orbax saves them, a resume restores them.

Inside the jitted train step the masks are applied twice: the objective multiplies each
kernel by its mask before the forward pass (pruned weights get zero gradient), and
:func:`post_update` (run after the optimizer update) recomputes the masks on update
steps and multiplies the kernels again, so pruned weights stay exactly zero through
Adam's moments and decoupled weight decay.

Methods (``prune.method``):

* ``magnitude``: each kernel (each layer of a stacked one) keeps its largest-magnitude
  weights; the sparsity follows Zhu & Gupta (2017):
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for ``t0 <= t <= t0 + n dt``
  (``prune.begin_step``, ``prune.end_step``, ``prune.frequency`` = dt), masks updated
  every dt steps; ``end_step=0`` prunes one-shot at ``begin_step``.
* ``nm``: in every group of ``prune.m`` consecutive weights along the (flattened)
  input/contraction dimension keep the ``prune.n`` largest (2:4: NVIDIA sparse tensor
  cores). Sparsity ``1 - n/m``.
* ``structured``: whole attention heads (KV groups under GQA) and MLP neurons, by
  weight-norm importance (the L2 norm of all weights of the unit: its q/k/v columns and
  out rows, or its wi columns and wo row); the same count in every layer, following
  the cubic schedule on the fraction of units. :mod:`research.compress.export` turns
  the result into a real smaller model (fewer heads, smaller ``mlp_dim``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research.config import ConfigError

MASK = 'prune_mask'
REPORT = 'sparsity.json'


class PruneMask(nnx.Variable):
  """1 = kept, 0 = pruned; same shape and logical axes as the kernel beside it."""


# --------------------------------------------------------------------------- schedule


def sparsity_at(step, p: ml_collections.ConfigDict, xp=jnp):
  """Zhu & Gupta's cubic sparsity at ``step`` (0 before ``begin_step``)."""
  t0 = p.begin_step
  t_end = max(p.end_step, t0)
  s_i, s_f = float(p.initial_sparsity), float(p.sparsity)
  if t_end == t0:
    return xp.where(step >= t0, s_f, 0.0)
  frac = xp.clip((step - t0) / (t_end - t0), 0.0, 1.0)
  s = s_f + (s_i - s_f) * (1.0 - frac) ** 3
  return xp.where(step >= t0, s, 0.0)


def is_update_step(step, p: ml_collections.ConfigDict, xp=jnp):
  """Masks are recomputed at t0, t0 + dt, ... and at the end step."""
  t0 = p.begin_step
  t_end = max(p.end_step, t0)
  on_grid = ((step - t0) % p.frequency == 0) | (step == t_end)
  return (step >= t0) & (step <= t_end) & on_grid


# --------------------------------------------------------------------------- masks


def _ranks(x: jax.Array) -> jax.Array:
  """Rank of each element along the last axis (0 = smallest; ties by position)."""
  return jnp.argsort(jnp.argsort(x, axis=-1, stable=True), axis=-1, stable=True)


def magnitude_mask(w_L: jax.Array, sparsity) -> jax.Array:
  """Per leading-axis slice: prune exactly floor(s * size) smallest-|w| weights."""
  x = jnp.abs(w_L.astype(jnp.float32)).reshape(w_L.shape[0], -1)
  k = jnp.floor(sparsity * x.shape[1] + 1e-6).astype(jnp.int32)
  return (_ranks(x) >= k).reshape(w_L.shape)


def nm_mask(w_L: jax.Array, in_axes: tuple[int, ...], n: int, m: int) -> jax.Array:
  """Keep the n largest |w| of every m consecutive weights along the flattened input
  axes (``in_axes`` index ``w_L`` whose axis 0 is the layer axis)."""
  out_axes = tuple(a for a in range(1, w_L.ndim) if a not in in_axes)
  perm = (0,) + out_axes + tuple(in_axes)
  xt = jnp.transpose(jnp.abs(w_L.astype(jnp.float32)), perm)
  shape = xt.shape
  in_flat = math.prod(w_L.shape[a] for a in in_axes)
  groups = xt.reshape(shape[0], -1, in_flat // m, m)
  keep = (_ranks(groups) >= m - n).reshape(shape)
  return jnp.transpose(keep, np.argsort(perm))


def _unit_keep(importance_LU: jax.Array, sparsity) -> jax.Array:
  """[L, U] importance -> keep mask with the same count per layer (>= 1 kept)."""
  u = importance_LU.shape[-1]
  k = jnp.minimum(jnp.floor(sparsity * u + 1e-6).astype(jnp.int32), u - 1)
  return _ranks(importance_LU) >= k


def _sq(x: jax.Array, keep_axes: tuple[int, ...]) -> jax.Array:
  axes = tuple(a for a in range(x.ndim) if a not in keep_axes)
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)


def head_masks(k: dict[str, jax.Array], sparsity) -> dict[str, jax.Array]:
  """Head (KV-group) masks for stacked ``query [L,D,N,H]``, ``key/value [L,D,K,H]``,
  ``out [L,N,H,D]`` kernels."""
  L, _, N, _ = k['query'].shape
  K = k['key'].shape[2]
  r = N // K
  imp = (_sq(k['query'], (0, 2)).reshape(L, K, r).sum(-1) + _sq(k['key'], (0, 2))
         + _sq(k['value'], (0, 2)) + _sq(k['out'], (0, 1)).reshape(L, K, r).sum(-1))
  keep_K = _unit_keep(jnp.sqrt(imp), sparsity)
  keep_N = jnp.repeat(keep_K, r, axis=-1)
  return {'query': jnp.broadcast_to(keep_N[:, None, :, None], k['query'].shape),
          'key': jnp.broadcast_to(keep_K[:, None, :, None], k['key'].shape),
          'value': jnp.broadcast_to(keep_K[:, None, :, None], k['value'].shape),
          'out': jnp.broadcast_to(keep_N[:, :, None, None], k['out'].shape)}


def neuron_masks(k: dict[str, jax.Array], sparsity) -> dict[str, jax.Array]:
  """MLP neuron masks for stacked ``wi*/[L,D,F]`` and ``wo [L,F,D]`` kernels."""
  imp = _sq(k['wo'], (0, 1))
  for name in ('wi_0', 'wi_1', 'wi'):
    if name in k:
      imp = imp + _sq(k[name], (0, 2))
  keep = _unit_keep(jnp.sqrt(imp), sparsity)
  out = {'wo': jnp.broadcast_to(keep[:, :, None], k['wo'].shape)}
  for name in ('wi_0', 'wi_1', 'wi'):
    if name in k:
      out[name] = jnp.broadcast_to(keep[:, None, :], k[name].shape)
  return out


# --------------------------------------------------------------------------- structure


def _path(path) -> str:
  return '/'.join(map(str, path))


def _in_axes(mod: nnx.Module) -> tuple[int, ...]:
  """Contraction axes of the kernel (without a layer axis)."""
  if isinstance(mod, nnx.Einsum):
    lhs, rest = mod.einsum_str.replace(' ', '').split(',')
    rhs, out = rest.split('->')
    return tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
  return (0,)


def _student_modules(model: nnx.Module):
  for path, mod in nnx.iter_modules(model):
    if path and str(path[0]) == 'teacher':
      continue
    yield _path(path), mod


def _stacked(model: nnx.Module, path: str) -> bool:
  return bool(getattr(model, 'scan_layers', False)) and path.startswith('blocks/')


def candidate_groups(model: nnx.Module, p: ml_collections.ConfigDict):
  """[(kind, {role: (path, module)})]: kind 'single' (one kernel), 'heads', 'mlp'."""
  from research.models.attention import Attention
  from research.models.layers import MLP
  groups = []
  if p.method == 'structured':
    for path, mod in _student_modules(model):
      if isinstance(mod, Attention) and p.structure in ('heads', 'both'):
        groups.append(('heads', {r: (f'{path}/{r}', getattr(mod, r))
                                 for r in ('query', 'key', 'value', 'out')}))
      if isinstance(mod, MLP) and p.structure in ('mlp', 'both'):
        groups.append(('mlp', {r: (f'{path}/{r}', getattr(mod, r))
                               for r in ('wi_0', 'wi_1', 'wi', 'wo') if hasattr(mod, r)}))
    return groups
  rx = re.compile(p.targets)
  for path, mod in _student_modules(model):
    if isinstance(getattr(mod, 'kernel', None), nnx.Param) and rx.fullmatch(path):
      groups.append(('single', {'kernel': (path, mod)}))
  return groups


def build_with_masks(build: Callable[[], nnx.Module], p: ml_collections.ConfigDict
                     ) -> nnx.Module:
  """The task's model with an all-ones :class:`PruneMask` beside every pruned kernel."""
  model = build()
  groups = candidate_groups(model, p)
  if not groups:
    raise ConfigError(f'prune.method={p.method!r}: no kernel to prune (prune.targets='
                      f'{p.targets!r} matches no module path).')
  for _, members in groups:
    for path, mod in members.values():
      kernel = mod.kernel
      if p.method == 'nm':
        stacked = _stacked(model, path)
        size = math.prod(kernel.shape[a + stacked] for a in _in_axes(mod))
        if size % p.m:
          raise ConfigError(f'prune.m={p.m} does not divide the input size {size} of '
                            f'{path}; choose prune.m dividing it (or exclude it with '
                            f'prune.targets).')
      setattr(mod, MASK, PruneMask(jnp.ones(kernel.shape, kernel.dtype),
                                   **kernel.get_metadata()))
  return model


def masked_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  return [(path, mod) for path, mod in _student_modules(model)
          if isinstance(getattr(mod, MASK, None), PruneMask)]


def apply_masks(model: nnx.Module) -> None:
  """kernel <- kernel * mask for every masked kernel (in place)."""
  for _, mod in masked_modules(model):
    mod.kernel[...] = mod.kernel[...] * mod.prune_mask[...].astype(mod.kernel.dtype)


def masked_forward(forward: Callable, model, batch, deterministic: bool):
  """The task's forward pass on the masked kernels (pruned weights get no gradient)."""
  apply_masks(model)
  return forward(model, batch, deterministic)


def compute_masks(model: nnx.Module, p: ml_collections.ConfigDict, sparsity
                  ) -> dict[str, jax.Array]:
  """New boolean masks {module path: mask} from the current (masked) kernels."""
  out = {}
  for kind, members in candidate_groups(model, p):
    first_path = next(iter(members.values()))[0]
    stacked = _stacked(model, first_path)
    k = {r: mod.kernel[...] if stacked else mod.kernel[...][None]
         for r, (_, mod) in members.items()}
    if kind == 'heads':
      new = head_masks(k, sparsity)
    elif kind == 'mlp':
      new = neuron_masks(k, sparsity)
    elif p.method == 'nm':
      (path, mod), = members.values()
      new = {'kernel': nm_mask(k['kernel'], tuple(a + 1 for a in _in_axes(mod)), p.n, p.m)}
    else:
      new = {'kernel': magnitude_mask(k['kernel'], sparsity)}
    for r, (path, _) in members.items():
      out[path] = new[r] if stacked else new[r][0]
  return out


def post_update(p: ml_collections.ConfigDict, model: nnx.Module, step) -> None:
  """After the optimizer update (inside jit): new masks on update steps, then
  kernel *= mask, so pruned weights are exactly zero in the saved state."""
  mods = dict(masked_modules(model))
  old = {path: mod.prune_mask[...] for path, mod in mods.items()}
  sparsity = sparsity_at(step, p)

  def recompute(_):
    new = compute_masks(model, p, sparsity)
    return {path: new[path].astype(old[path].dtype) for path in old}

  masks = jax.lax.cond(is_update_step(step, p), recompute, lambda _: old, None)
  for path, mod in mods.items():
    mod.prune_mask[...] = masks[path]
    mod.kernel[...] = mod.kernel[...] * masks[path].astype(mod.kernel.dtype)


# --------------------------------------------------------------------------- wrapper

NAME = 'prune'


def wrap(task, config: ml_collections.ConfigDict, ctx):
  """The task with masks beside its pruned kernels, applied before the forward pass and
  after every optimizer update, and the sparsity report at the end."""
  del ctx
  p = config.prune
  return task.wrapped(
      NAME, build_model=functools.partial(build_with_masks, task.build_model, p),
      forward=functools.partial(masked_forward, task.forward),
      post_update=task.then_post_update(functools.partial(post_update, p)),
      at_end=task.then_at_end(functools.partial(at_end, p)))


# --------------------------------------------------------------------------- report


def _layer_names(model, path: str, n: int) -> list[str]:
  if _stacked(model, path):
    head, _, tail = path.partition('/')
    return [f'{head}/{i}/{tail}' for i in range(n)]
  return [path]


def sparse_bytes(method: str, size: int, nonzero: int, itemsize: int, n: int = 2,
                 m: int = 4) -> int:
  """Storage of a pruned kernel: values + index metadata of the sparse format.

  magnitude: nonzero values + a 1-bit-per-element bitmap; nm: kept values + ceil(log2 m)
  bits per kept value (2:4: 2 bits, NVIDIA's format); structured: the dense smaller
  kernel (the removed rows/columns cost nothing).
  """
  if method == 'magnitude':
    return nonzero * itemsize + math.ceil(size / 8)
  if method == 'nm':
    kept = size * n // m
    return kept * itemsize + math.ceil(kept * math.ceil(math.log2(m)) / 8)
  return nonzero * itemsize


def sparsity_report(model: nnx.Module, p: ml_collections.ConfigDict) -> dict[str, Any]:
  """Real sparsity (exact zeros of the kernels) per layer, totals and model bytes."""
  mods = masked_modules(model)
  stats = {}
  for path, mod in mods:
    kern = np.asarray(jax.device_get(mod.kernel[...]))
    mask = np.asarray(jax.device_get(mod.prune_mask[...]))
    if not _stacked(model, path):
      kern, mask = kern[None], mask[None]
    for name, k, mk in zip(_layer_names(model, path, kern.shape[0]), kern, mask):
      stats[f'{name}/kernel'] = {
          'shape': list(k.shape), 'size': int(k.size), 'zeros': int((k == 0).sum()),
          'sparsity': float((k == 0).mean()), 'mask_sparsity': float((mk == 0).mean())}
  masked_paths = {f'{path}/kernel' for path, _ in mods}
  total = zeros = dense_bytes = eff_bytes = nonzero_bytes = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = np.asarray(jax.device_get(var.get_value()))
    name = _path(path)
    total += x.size
    z = int((x == 0).sum()) if name in masked_paths else 0
    zeros += z
    dense_bytes += x.nbytes
    nonzero_bytes += (x.size - z) * x.itemsize
    if name in masked_paths:
      eff_bytes += sparse_bytes(p.method, x.size, x.size - z, x.itemsize, p.n, p.m)
    else:
      eff_bytes += x.nbytes
  t_size = sum(s['size'] for s in stats.values())
  t_zeros = sum(s['zeros'] for s in stats.values())
  out = {'method': p.method, 'target_sparsity': (1 - p.n / p.m) if p.method == 'nm'
         else float(p.sparsity),
         'pruned_params': t_size, 'pruned_zeros': t_zeros,
         'sparsity': t_zeros / max(t_size, 1), 'model_params': total,
         'model_zeros': zeros, 'model_sparsity': zeros / max(total, 1),
         'nonzero_params': total - zeros, 'dense_bytes': dense_bytes,
         'nonzero_bytes': nonzero_bytes, 'effective_bytes': eff_bytes, 'layers': stats}
  if p.method == 'structured':
    out['structure'] = structure_counts(model)
  return out


def structure_counts(model: nnx.Module) -> dict[str, Any]:
  """Kept heads (KV groups) and MLP neurons per layer, read from the masks."""
  from research.models.attention import Attention
  from research.models.layers import MLP
  heads, neurons = [], []
  for path, mod in _student_modules(model):
    stacked = _stacked(model, path)
    if isinstance(mod, Attention) and isinstance(getattr(mod.key, MASK, None), PruneMask):
      m = np.asarray(jax.device_get(mod.key.prune_mask[...]))
      m = m if stacked else m[None]
      heads += [int(x) for x in (m != 0).any(axis=(1, 3)).sum(-1)]
    if isinstance(mod, MLP) and isinstance(getattr(mod.wo, MASK, None), PruneMask):
      m = np.asarray(jax.device_get(mod.wo.prune_mask[...]))
      m = m if stacked else m[None]
      neurons += [int(x) for x in (m != 0).any(axis=2).sum(-1)]
  return {'kv_heads_kept_per_layer': heads, 'mlp_neurons_kept_per_layer': neurons}


def at_end(p: ml_collections.ConfigDict, ts, workdir: str, is_main: bool) -> dict[str, Any]:
  """Trainer hook: writes ``WORKDIR/sparsity.json``, logs it; returns summary fields."""
  model, _ = nnx.merge(ts.graphdef, ts.state)
  rep = sparsity_report(model, p)
  for name, s in rep['layers'].items():
    logging.info('sparsity %-40s %6.2f%% (%d/%d zero)', name, 100 * s['sparsity'],
                 s['zeros'], s['size'])
  logging.info('prune.method=%s: pruned kernels %.2f%% sparse, model %.2f%%; bytes dense '
               '%s, nonzero %s, effective %s', p.method, 100 * rep['sparsity'],
               100 * rep['model_sparsity'], f'{rep["dense_bytes"]:,}',
               f'{rep["nonzero_bytes"]:,}', f'{rep["effective_bytes"]:,}')
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, REPORT), 'w') as f:
      json.dump(rep, f, indent=2)
  return {'sparsity': rep['sparsity'], 'model_sparsity': rep['model_sparsity'],
          'nonzero_params': rep['nonzero_params'], 'effective_bytes': rep['effective_bytes']}
