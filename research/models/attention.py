"""Multi-head self-attention: MHA / GQA / MQA, RoPE, causal or bidirectional, KV cache.

The attention core is ``jax.nn.dot_product_attention``: it takes K/V with fewer heads
than Q (GQA/MQA, no repeat of K/V in memory) and computes logits and softmax in
float32. ``implementation='cudnn'`` selects the fused cuDNN kernel on NVIDIA GPUs.

Decoding uses a functional KV cache: the caller passes this layer's ``k``/``v`` arrays
``[B, T_max, Hkv, Dh]`` and the write index, and gets the updated arrays back, so a
decode step is a pure, jittable function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import projection
from research.models.layers import normal_init
from research.sharding import constrain


def rope_angles(positions_BL: jax.Array, head_dim: int, theta: float
                ) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) tables ``[B, L, Dh/2]`` in float32 for rotary position embeddings."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles_BLK), jnp.cos(angles_BLK)


def apply_rope(x_BLNH: jax.Array, sin_BLK: jax.Array, cos_BLK: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + Dh/2]) (the "rotate-half" convention of LLaMA/NeoX)."""
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin_BLK[:, :, None, :], cos_BLK[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)


class Attention(nnx.Module):
  """Self-attention with ``num_kv_heads`` K/V heads shared by groups of query heads.

  Parameters (``nnx.Einsum`` kernels):
    query ``[D, N, Dh]`` ('embed', 'heads', 'kv'); key, value ``[D, K, Dh]``
    ('embed', 'kv_heads', 'kv'); out ``[N, Dh, D]`` ('heads', 'kv', 'embed').
    With ``use_bias`` (GPT-2) each also has a ``bias`` of its output shape
    (``[N, Dh]``, ``[K, Dh]``, ``[D]``), zero-initialised.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               causal: bool, use_rope: bool, implementation: str, init_std: float,
               out_init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias: bool = False, projection_vjp: str = 'autodiff'):
    _, einsum_kwargs = projection.module_kwargs(projection_vjp)

    def proj(eq, shape, std, names):
      n_out = len(eq.split('->')[1]) - 2  # Output feature axes (after B, L).
      bias = dict(bias_shape=shape[-n_out:], bias_init=nnx.with_partitioning(
          jax.nn.initializers.zeros, names[-n_out:])) if use_bias else {}
      return nnx.Einsum(eq, shape, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=normal_init(std, names), rngs=rngs, **bias,
                        **einsum_kwargs)

    self.query = proj('BLD,DNH->BLNH', (d_model, num_heads, head_dim), init_std,
                      ('embed', 'heads', 'kv'))
    self.key = proj('BLD,DKH->BLKH', (d_model, num_kv_heads, head_dim), init_std,
                    ('embed', 'kv_heads', 'kv'))
    self.value = proj('BLD,DKH->BLKH', (d_model, num_kv_heads, head_dim), init_std,
                      ('embed', 'kv_heads', 'kv'))
    self.out = proj('BLNH,NHD->BLD', (num_heads, head_dim, d_model), out_init_std,
                    ('heads', 'kv', 'embed'))
    self.causal = causal
    self.use_rope = use_rope
    self.implementation = implementation

  def __call__(self, x_BLD: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
               mask_BL: jax.Array | None = None,
               kv_cache: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns ``(out_BLD, new_kv_cache)``.

    Args:
      x_BLD: normed inputs.
      rope: ``(sin, cos)`` from :func:`rope_angles` (None: no rotary embedding).
      mask_BL: 1 for real tokens, 0 for padding; padded keys are not attended to.
      kv_cache: this layer's ``(k, v)``, each ``[B, T_max, K, Dh]``; the new keys and
        values are written at ``cache_index`` and the queries attend to cache
        positions ``< cache_index + L`` (and ``<=`` their own position when causal).
    """
    q_BLNH = constrain(self.query(x_BLD), ('batch', 'seq', 'act_heads', 'act_kv'))
    k_BLKH = constrain(self.key(x_BLD), ('batch', 'seq', 'act_kv_heads', 'act_kv'))
    v_BLKH = constrain(self.value(x_BLD), ('batch', 'seq', 'act_kv_heads', 'act_kv'))
    if self.use_rope:
      assert rope is not None, 'use_rope needs the (sin, cos) tables'
      q_BLNH = apply_rope(q_BLNH, *rope)
      k_BLKH = apply_rope(k_BLKH, *rope)

    new_cache = None
    if kv_cache is None:
      mask = None if mask_BL is None else mask_BL.astype(bool)[:, None, None, :]
      o_BLNH = jax.nn.dot_product_attention(
          q_BLNH, k_BLKH, v_BLKH, mask=mask, is_causal=self.causal,
          implementation=self.implementation)
    else:
      if mask_BL is not None:
        raise NotImplementedError('mask_BL together with a KV cache is not supported.')
      cache_k, cache_v = kv_cache
      L, T = x_BLD.shape[1], cache_k.shape[1]
      cache_k = jax.lax.dynamic_update_slice_in_dim(
          cache_k, k_BLKH.astype(cache_k.dtype), cache_index, axis=1)
      cache_v = jax.lax.dynamic_update_slice_in_dim(
          cache_v, v_BLKH.astype(cache_v.dtype), cache_index, axis=1)
      new_cache = (cache_k, cache_v)
      key_pos_T = jnp.arange(T)
      query_pos_L = cache_index + jnp.arange(L)
      if self.causal:
        mask_LT = key_pos_T[None, :] <= query_pos_L[:, None]
      else:
        mask_LT = jnp.broadcast_to(key_pos_T[None, :] < cache_index + L, (L, T))
      mask = mask_LT[None, None]
      # The explicit [L, T] mask needs the XLA path (the cuDNN kernel takes only
      # causal/padding masks); decode steps are small, so this costs little.
      o_BLNH = jax.nn.dot_product_attention(
          q_BLNH, cache_k.astype(q_BLNH.dtype), cache_v.astype(q_BLNH.dtype), mask=mask,
          implementation='xla')
    o_BLNH = constrain(o_BLNH, ('batch', 'seq', 'act_heads', 'act_kv'))
    return self.out(o_BLNH), new_cache
