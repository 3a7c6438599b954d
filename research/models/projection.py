"""Projections whose backward pass transposes the activation, not the gradient.

Every projection in the Transformer contracts the trailing ``n`` axes of the
activation ``x`` with the leading ``n`` axes of the kernel ``w`` (``'BLD,DNH->BLNH'``,
``'BLNH,NHD->BLD'``, ``nnx.Linear``'s ``'...i,io->...o'``). Its weight gradient
contracts ``x`` with the output gradient ``dy`` over the token axes. Under plain
autodiff XLA:CPU lays that dot out by transposing ``dy``: for the MLP's ``wi_*``
kernels that is the ``[tokens, mlp_dim]`` SwiGLU gradient, and the transposed write is
fused into the elementwise SwiGLU backward, which then runs several times slower than
the dot it feeds (measured: 22% of the ``small`` step). :func:`projection` has a custom
VJP that instead transposes ``x`` explicitly (the ``[tokens, d_model]`` side, 2.7x
smaller for the MLP) and hands the dots row-major operands.

Mathematically this is the same gradient; numerically it differs by float
reassociation only. It is selected by ``model.projection_vjp='transpose_input'``
(:data:`PROJECTION_VJPS`) and passed to ``nnx.Linear`` / ``nnx.Einsum`` as their
``dot_general`` / ``einsum_op``, so parameter paths, LoRA and pruning are unchanged.
QAT is not compatible: qwix intercepts the forward ``dot_general`` but would not see
this hand-written backward (no straight-through gradient of the quantized operands),
so the config validation rejects the combination.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PROJECTION_VJPS = ('autodiff', 'transpose_input')


def _forward(x: jax.Array, w: jax.Array, n: int, precision: Any,
             preferred_element_type: Any) -> jax.Array:
  dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
  return lax.dot_general(x, w, dims, precision=precision,
                         preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def projection(x: jax.Array, w: jax.Array, n: int, precision: Any = None,
               preferred_element_type: Any = None) -> jax.Array:
  """``x[..., i_1..i_n] · w[i_1..i_n, o...]`` -> ``[..., o...]`` (see module doc)."""
  return _forward(x, w, n, precision, preferred_element_type)


def _projection_fwd(x, w, n, precision, preferred_element_type):
  return _forward(x, w, n, precision, preferred_element_type), (x, w)


def _projection_bwd(n, precision, preferred_element_type, residuals, dy):
  del preferred_element_type
  x, w = residuals
  n_tok = x.ndim - n  # Token axes (B, L, ...) shared by x and dy.
  # dx[t, i] = sum_o dy[t, o] w[i, o]
  dx = lax.dot_general(dy, w, ((tuple(range(n_tok, dy.ndim)), tuple(range(n, w.ndim))),
                               ((), ())), precision=precision)
  # dw[i, o] = sum_t xT[i, t] dy[t, o], with the input axes of x moved to the front.
  x_t = jnp.transpose(x, tuple(range(n_tok, x.ndim)) + tuple(range(n_tok)))
  dw = lax.dot_general(x_t, dy, ((tuple(range(n, x.ndim)), tuple(range(n_tok))), ((), ())),
                       precision=precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


projection.defvjp(_projection_fwd, _projection_bwd)


def linear_dot_general(x: jax.Array, w: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None, out_sharding=None) -> jax.Array:
  """``nnx.Linear(dot_general=...)``: its contraction (last axis of x, first of w)."""
  (lhs_c, rhs_c), batch = dimension_numbers
  if tuple(lhs_c) != (x.ndim - 1,) or tuple(rhs_c) != (0,) or batch != ((), ()):
    raise ValueError(f'linear_dot_general expects nnx.Linear\'s contraction, got '
                     f'{dimension_numbers}.')
  if out_sharding is not None:
    raise ValueError('model.projection_vjp=\'transpose_input\' does not take out_sharding; '
                     'use model.projection_vjp=\'autodiff\'.')
  return projection(x, w, 1, precision, preferred_element_type)


def _trailing_contraction(eq: str) -> int | None:
  """``n`` when ``eq`` is ``'<tokens><in>,<in><out>-><tokens><out>'``, else None."""
  lhs_rhs, out = eq.replace(' ', '').split('->')
  lhs, rhs = lhs_rhs.split(',')
  if '.' in eq or len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
    return None
  n = sum(c in rhs for c in lhs)  # Contracted axes must end lhs and start rhs.
  if n == 0 or lhs[-n:] != rhs[:n]:
    return None
  return n if out == lhs[:-n] + rhs[n:] else None


def projection_einsum(eq: str, x: jax.Array, w: jax.Array, precision=None,
                      preferred_element_type=None, out_sharding=None) -> jax.Array:
  """``nnx.Einsum(einsum_op=...)``: :func:`projection` for projection equations."""
  n = _trailing_contraction(eq)
  if n is None or out_sharding is not None:
    raise ValueError(f'model.projection_vjp=\'transpose_input\' supports einsums of the '
                     f'form "BL<in>,<in><out>->BL<out>" without out_sharding, got {eq!r}; '
                     f'use model.projection_vjp=\'autodiff\'.')
  return projection(x, w, n, precision, preferred_element_type)


def module_kwargs(projection_vjp: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(nnx.Linear kwargs, nnx.Einsum kwargs)`` that select the backward pass."""
  if projection_vjp == 'autodiff':
    return {}, {}
  if projection_vjp == 'transpose_input':
    return {'dot_general': linear_dot_general}, {'einsum_op': projection_einsum}
  raise ValueError(f'model.projection_vjp={projection_vjp!r} is unknown; use one of '
                   f'{", ".join(map(repr, PROJECTION_VJPS))}.')


def use_autodiff(model: Any) -> None:
  """Puts the default ``dot_general`` / ``einsum_op`` back on every projection.

  For qwix: its interception of those ops must run at the model's trace level, not
  inside this custom VJP. Inference (PTQ) has no backward, so nothing else changes.
  """
  from flax import nnx  # Local: the ops above do not depend on Flax.
  for _, mod in nnx.iter_modules(model):
    if isinstance(mod, nnx.Linear) and mod.dot_general is linear_dot_general:
      mod.dot_general = lax.dot_general  # nnx.Linear's default.
    elif isinstance(mod, nnx.Einsum) and mod.einsum_op is projection_einsum:
      mod.einsum_op = jnp.einsum  # nnx.Einsum's default.
