"""LoRA: low-rank adapters on the projections of a built model, and merging them back.

:func:`apply_lora` replaces every ``nnx.Einsum`` / ``nnx.Linear`` whose path matches a
regex (``'attn/(query|value)'``...) by a :class:`LoRAProjection` that computes::

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

with ``A`` ``[*in_shape, r]`` (normal, std ``1/sqrt(fan_in)``) and ``B`` ``[r, *out_shape]``
(zeros), so an adapted model starts exactly equal to its base. The base ``kernel`` (and
``bias``) keep their parameter paths (``blocks/attn/query/kernel``), so a pretrained
checkpoint loads into an adapted model unchanged; the adapters are new leaves
``.../lora_a`` and ``.../lora_b`` of type ``nnx.LoRAParam``, which is what the
fine-tuning trainer's filter makes trainable (everything else gets no gradient and no
optimizer state). Under ``scan_layers`` the adapters are stacked on the leading
``'layers'`` axis like the kernels.

:func:`merge_lora` folds ``(alpha / rank) * A @ B`` into the kernels and puts plain
``nnx.Einsum`` / ``nnx.Linear`` modules back: the merged model has the base model's
structure (for export) and the same outputs as base + adapters.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from research.sharding import logical_names


class LoRAProjection(nnx.Module):
  """A projection ``y = einsum(eq, x, kernel) (+ bias)`` plus a low-rank update.

  ``eq`` contracts the last ``n_in`` axes of ``x`` with the first ``n_in`` axes of the
  kernel (true of every projection in the Transformer: ``'BLD,DNH->BLNH'`` has
  ``n_in=1``, ``'BLNH,NHD->BLD'`` has ``n_in=2``).
  """

  def __init__(self, base: nnx.Einsum | nnx.Linear, *, rank: int, alpha: float,
               dropout: float, stacked: int, key: jax.Array):
    if isinstance(base, nnx.Einsum):
      eq = base.einsum_str.replace(' ', '')
      self.base_kind = 'einsum'
      self.precision = base.precision
    elif isinstance(base, nnx.Linear):
      eq = '...i,io->...o'
      self.base_kind = 'linear'
      self.precision = base.precision
    else:
      raise TypeError(f'LoRA supports nnx.Einsum and nnx.Linear, got {type(base).__name__}.')
    self.eq = eq
    self.dtype = base.dtype
    self.kernel = base.kernel
    self.bias = base.bias  # A Param or None.
    shape = tuple(self.kernel.shape)[stacked:]  # Per-layer kernel shape.
    self.n_in = _contracted_axes(eq, len(shape))
    in_shape, out_shape = shape[:self.n_in], shape[self.n_in:]
    self.in_shape, self.out_shape = in_shape, out_shape
    self.rank = int(rank)
    self.alpha = float(alpha)
    self.scale = float(alpha) / float(rank)
    self.dropout_rate = float(dropout)
    self.deterministic = True  # Set by set_lora_deterministic() (the task's objective).
    lead = tuple(self.kernel.shape)[:stacked]
    names = logical_names(self.kernel) or (None,) * len(self.kernel.shape)
    lead_names, in_names, out_names = (names[:stacked], names[stacked:stacked + self.n_in],
                                       names[stacked + self.n_in:])
    pdtype = self.kernel[...].dtype
    fan_in = math.prod(in_shape)
    k_a, k_drop = jax.random.split(key)
    a_init = nnx.with_partitioning(jax.nn.initializers.normal(1.0 / math.sqrt(fan_in)),
                                   lead_names + in_names + ('lora_rank',))
    b_init = nnx.with_partitioning(jax.nn.initializers.zeros,
                                   lead_names + ('lora_rank',) + out_names)
    self.lora_a = nnx.LoRAParam(a_init(k_a, lead + in_shape + (rank,), pdtype))
    self.lora_b = nnx.LoRAParam(b_init(k_a, lead + (rank,) + out_shape, pdtype))
    if self.dropout_rate > 0:
      n = math.prod(lead)
      keys = jax.random.split(k_drop, n).reshape(lead) if lead else k_drop
      self.lora_key = nnx.RngKey(keys)
      self.lora_count = nnx.RngCount(jnp.zeros(lead, jnp.uint32))
    else:
      self.lora_key = nnx.data(None)
      self.lora_count = nnx.data(None)

  def base_forward(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jnp.einsum(self.eq, x, kernel, precision=self.precision)
    if bias is not None:
      y = y + bias.astype(dtype)  # The bias has the output feature shape (trailing axes).
    return y

  def delta(self, x: jax.Array) -> jax.Array:
    """The adapter's contribution ``scale * B(A(x))``, same shape as the output."""
    dtype = self.dtype or x.dtype
    if self.dropout_rate > 0 and not self.deterministic:
      key = jax.random.fold_in(self.lora_key[...], self.lora_count[...])
      self.lora_count[...] = self.lora_count[...] + 1
      keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)
    batch_shape = x.shape[:x.ndim - self.n_in]
    x_flat = x.reshape(batch_shape + (-1,)).astype(dtype)
    a = self.lora_a[...].reshape(-1, self.rank).astype(dtype)
    b = self.lora_b[...].reshape(self.rank, -1).astype(dtype)
    h = (x_flat @ a) @ b
    return (self.scale * h).reshape(batch_shape + self.out_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.base_forward(x) + self.delta(x)

  def merged_kernel(self) -> jax.Array:
    """``kernel + scale * A @ B`` (per layer when stacked), in the kernel's dtype."""
    a, b, k = self.lora_a[...], self.lora_b[...], self.kernel[...]
    lead = k.shape[:k.ndim - len(self.in_shape) - len(self.out_shape)]
    a2 = a.reshape(lead + (-1, self.rank)).astype(jnp.float32)
    b2 = b.reshape(lead + (self.rank, -1)).astype(jnp.float32)
    update = (a2 @ b2).reshape(k.shape) * self.scale
    return (k.astype(jnp.float32) + update).astype(k.dtype)


def _contracted_axes(eq: str, kernel_ndim: int) -> int:
  """How many leading kernel axes ``eq`` contracts with trailing input axes."""
  lhs, rest = eq.split(',')
  rhs, out = rest.split('->')
  if rhs.startswith('...'):
    raise ValueError(f'unsupported projection {eq!r}')
  lhs_core = lhs.replace('...', '')
  contracted = [c for c in rhs if c in lhs_core and c not in out]
  n = len(contracted)
  if rhs[:n] != ''.join(contracted) or not lhs_core.endswith(''.join(contracted)) or \
      len(rhs) != kernel_ndim:
    raise ValueError(f'LoRA needs the contracted axes first in the kernel and last in the '
                     f'input; {eq!r} is not of that form.')
  return n


def _modules_with_paths(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
  return [(tuple(p), m) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]


def _stacked_axes(module: nnx.Module) -> int:
  """1 when the module's kernel carries the leading scanned 'layers' axis, else 0."""
  names = logical_names(module.kernel) or ()
  return 1 if names and names[0] == 'layers' else 0


def _set_child(model: nnx.Module, path: tuple[Any, ...], child: nnx.Module) -> None:
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  last = path[-1]
  if isinstance(last, int):
    parent[last] = child
  else:
    setattr(parent, last, child)


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets: str,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
  """Wraps the projections whose '/'-joined module path matches ``targets``, in place.

  Returns the adapted module paths. Raises ValueError when nothing matches (a typo in
  the regex would otherwise silently train only the head).
  """
  if rank <= 0:
    raise ValueError(f'LoRA rank must be positive, got {rank}.')
  rx = re.compile(targets)
  found = []
  for path, module in _modules_with_paths(model):
    if not isinstance(module, (nnx.Einsum, nnx.Linear)) or isinstance(module, LoRAProjection):
      continue
    name = '/'.join(str(p) for p in path)
    if rx.search(name):
      found.append((path, name, module))
  if not found:
    names = ['/'.join(map(str, p)) for p, m in _modules_with_paths(model)
             if isinstance(m, (nnx.Einsum, nnx.Linear))]
    raise ValueError(f'finetune.lora_targets={targets!r} matches no projection; the '
                     f'projections are {names}.')
  root = jax.random.key(seed)

  def build():
    for i, (path, _, module) in enumerate(found):
      lora = LoRAProjection(module, rank=rank, alpha=alpha, dropout=dropout,
                            stacked=_stacked_axes(module), key=jax.random.fold_in(root, i))
      _set_child(model, path, lora)

  if spmd.get_logical_axis_rules():
    build()
  else:  # No mesh rules (unit tests, notebooks): plain arrays, like the Transformer.
    with nnx.use_eager_sharding(False):
      build()
  return [name for _, name, _ in found]


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRAProjection]]:
  return [('/'.join(map(str, p)), m) for p, m in _modules_with_paths(model)
          if isinstance(m, LoRAProjection)]


def set_lora_deterministic(model: nnx.Module, deterministic: bool) -> None:
  """Turns adapter dropout off (eval) or on (training) on every LoRA module."""
  for _, m in lora_modules(model):
    m.deterministic = bool(deterministic)


def count_lora_params(model: nnx.Module) -> int:
  return sum(int(math.prod(v.shape)) for _, v in
             nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel and restores plain projections, in place.

  The result has exactly the parameter paths of the un-adapted model (no ``lora_*``
  leaves), so it saves and loads as an ordinary checkpoint. Returns ``model``.
  """
  for name, m in lora_modules(model):
    kernel = m.kernel[...]
    merged = m.merged_kernel()
    shape = tuple(kernel.shape)
    stacked = len(shape) - len(m.in_shape) - len(m.out_shape)
    per_layer = shape[stacked:]
    use_bias = m.bias is not None
    with nnx.use_eager_sharding(False):
      if m.base_kind == 'einsum':
        n_out = len(m.out_shape)
        plain = nnx.eval_shape(lambda: nnx.Einsum(
            m.eq, per_layer, bias_shape=per_layer[-n_out:] if use_bias else None,
            dtype=m.dtype, param_dtype=kernel.dtype, precision=m.precision,
            rngs=nnx.Rngs(0)))
      else:
        plain = nnx.eval_shape(lambda: nnx.Linear(
            per_layer[0], per_layer[1], use_bias=use_bias, dtype=m.dtype,
            param_dtype=kernel.dtype, precision=m.precision, rngs=nnx.Rngs(0)))
    m.kernel[...] = merged
    plain.kernel = m.kernel  # Same Variable (metadata, sharding), merged value.
    plain.bias = m.bias if use_bias else None
    path = tuple(int(p) if p.isdigit() else p for p in name.split('/'))
    _set_child(model, path, plain)
  return model
