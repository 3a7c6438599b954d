"""Building blocks of the Transformer: norms, MLPs, embeddings, initializers.

Every parameter initializer is wrapped with ``nnx.with_partitioning`` and names only
logical axes (``'embed'``, ``'mlp'``, ``'vocab'``...); ``research/sharding.py`` maps
them to mesh axes. Parameters are stored in ``param_dtype`` and the computation runs in
``dtype`` (norm statistics always in float32).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import projection
from research.sharding import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def to_dtype(name: str) -> jnp.dtype:
  """``'bfloat16'`` -> ``jnp.bfloat16`` (the config stores dtypes as strings)."""
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; use one of {sorted(DTYPES)}.')
  return jnp.dtype(DTYPES[name])


def normal_init(std: float, names: Sequence[str | None]) -> nnx.Initializer:
  """N(0, std^2) initializer annotated with logical axis names."""
  return nnx.with_partitioning(jax.nn.initializers.normal(stddev=std), tuple(names))


# --------------------------------------------------------------------------- norms


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``; statistics in float32, output in ``dtype``."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init; the argument keeps the module signature uniform.
    init = nnx.with_partitioning(jax.nn.initializers.ones, ('norm',))
    self.scale = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """``(x - mean) / std * scale + bias``; statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    ones = nnx.with_partitioning(jax.nn.initializers.ones, ('norm',))
    zeros = nnx.with_partitioning(jax.nn.initializers.zeros, ('norm',))
    self.scale = nnx.Param(ones(jax.random.key(0), (dim,), param_dtype))
    self.bias = nnx.Param(zeros(jax.random.key(0), (dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    x = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype, param_dtype) -> RMSNorm | LayerNorm:
  if kind == 'rmsnorm':
    return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  if kind == 'layernorm':
    return LayerNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f'unknown norm {kind!r}; use rmsnorm or layernorm.')


# --------------------------------------------------------------------------- MLP


class MLP(nnx.Module):
  """Position-wise feed-forward block.

  ``swiglu``: ``wo(silu(wi_0 x) * wi_1 x)`` (three kernels, LLaMA/PaLM style).
  ``gelu``: ``wo(gelu(wi x))`` (two kernels, GPT-2 style, tanh approximation).
  Kernels are ``nnx.Linear`` (bias only with ``use_bias``, GPT-2): ``.../wi_0/kernel``
  is ('embed', 'mlp'), ``.../wo/kernel`` is ('mlp', 'embed').
  """

  def __init__(self, d_model: int, mlp_dim: int, *, kind: str, init_std: float,
               out_init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias: bool = False, projection_vjp: str = 'autodiff'):
    linear_kwargs, _ = projection.module_kwargs(projection_vjp)

    def dense(din, dout, std, names):
      return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=normal_init(std, names),
                        bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, names[1:]),
                        rngs=rngs, **linear_kwargs)

    self.kind = kind
    if kind == 'swiglu':
      self.wi_0 = dense(d_model, mlp_dim, init_std, ('embed', 'mlp'))
      self.wi_1 = dense(d_model, mlp_dim, init_std, ('embed', 'mlp'))
    elif kind == 'gelu':
      self.wi = dense(d_model, mlp_dim, init_std, ('embed', 'mlp'))
    else:
      raise ValueError(f'unknown mlp_kind {kind!r}; use swiglu or gelu.')
    self.wo = dense(mlp_dim, d_model, out_init_std, ('mlp', 'embed'))

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    if self.kind == 'swiglu':
      h_BLF = jax.nn.silu(self.wi_0(x_BLD)) * self.wi_1(x_BLD)
    else:
      h_BLF = jax.nn.gelu(self.wi(x_BLD), approximate=True)
    h_BLF = constrain(h_BLF, ('batch', 'seq', 'act_mlp'))
    return self.wo(h_BLF)


# --------------------------------------------------------------------------- embeddings


def token_embedding(vocab_size: int, d_model: int, *, init_std: float, dtype, param_dtype,
                    rngs: nnx.Rngs) -> nnx.Embed:
  """Token table ``embedding`` [vocab, d_model], logical ('vocab', 'embed').

  ``.attend(x_BLD)`` gives tied logits ``x @ embedding.T``.
  """
  return nnx.Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype,
                   embedding_init=normal_init(init_std, ('vocab', 'embed')), rngs=rngs)


def position_embedding(max_len: int, d_model: int, *, init_std: float, dtype, param_dtype,
                       rngs: nnx.Rngs) -> nnx.Embed:
  """Learned absolute positions ``embedding`` [max_len, d_model], logical ('pos', 'embed')."""
  return nnx.Embed(max_len, d_model, dtype=dtype, param_dtype=param_dtype,
                   embedding_init=normal_init(init_std, ('pos', 'embed')), rngs=rngs)


def output_head(d_model: int, vocab_size: int, *, init_std: float, dtype, param_dtype,
                rngs: nnx.Rngs) -> nnx.Linear:
  """Untied output projection ``kernel`` [d_model, vocab], logical ('embed', 'vocab')."""
  return nnx.Linear(d_model, vocab_size, use_bias=False, dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=normal_init(init_std, ('embed', 'vocab')), rngs=rngs)
