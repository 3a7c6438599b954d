"""Multi-head self-attention: MHA / GQA / MQA, RoPE (with scaling), masks that compose,
KV cache.

The attention core is ``jax.nn.dot_product_attention``: it takes K/V with fewer heads
than Q (GQA/MQA, no repeat of K/V in memory) and computes logits and softmax in
float32. ``implementation='cudnn'`` selects the fused cuDNN kernel on NVIDIA GPUs.

Masks compose (a key is visible when every one allows it):

* causal: key index <= query index (``model.causal``);
* padding: ``mask_BL`` (1 = real token) hides padded keys;
* sliding window ``w`` (> 0): query ``i`` sees keys ``j`` with ``i - j < w`` (itself
  and the ``w - 1`` before it: Hugging Face's ``sliding_window`` semantics; ``|i - j|
  < w`` when not causal);
* documents: ``segment_ids_BL`` (int32) lets a token see only keys of its own segment
  (segment 0, packing padding, sees only segment 0, so no row is empty).

:func:`plan_attention` decides, from what is present, the arguments of
``jax.nn.dot_product_attention`` for the requested implementation, or a fallback to
XLA with the reason (logged once). It is a pure function of shapes and flags, so its
cuDNN decisions are tested on CPU.

Decoding uses a functional KV cache: the caller passes this layer's ``k``/``v`` arrays
``[B, T_max, Hkv, Dh]`` and the write index, and gets the updated arrays back, so a
decode step is a pure, jittable function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from research.models import context_parallel, projection
from research.models.layers import normal_init
from research.sharding import constrain

ROPE_SCALINGS = ('none', 'linear', 'llama3', 'yarn')


# --------------------------------------------------------------------------- RoPE


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as transformers' ``ROPE_INIT_FUNCTIONS`` computes it.

  ``kind``: 'none' | 'linear' (positions / factor) | 'llama3' (Llama 3.1: long
  wavelengths / factor, short ones kept, a smooth ramp between) | 'yarn' (NTK-by-parts
  ramp between interpolated and extrapolated frequencies, cos/sin scaled by
  ``attention_factor``). ``original_max_len`` is the pre-extension context
  (``original_max_position_embeddings``).
  """
  kind: str = 'none'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float = 0.0  # yarn: 0 = 0.1 * ln(factor) + 1 (the paper's mscale).
  truncate: bool = True  # yarn: floor/ceil the correction range (transformers' default).

  @classmethod
  def from_config(cls, cfg: Any) -> 'RopeScaling':
    """From the ``model.rope_*`` keys of a config."""
    return cls(kind=cfg.rope_scaling, factor=float(cfg.rope_factor),
               low_freq_factor=float(cfg.rope_low_freq_factor),
               high_freq_factor=float(cfg.rope_high_freq_factor),
               original_max_len=int(cfg.rope_original_max_len),
               beta_fast=float(cfg.rope_beta_fast), beta_slow=float(cfg.rope_beta_slow),
               attention_factor=float(cfg.rope_attention_factor),
               truncate=bool(cfg.rope_truncate))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
                     ) -> tuple[np.ndarray, float]:
  """(inverse frequencies ``[Dh/2]`` float32, scale of cos/sin) on the host.

  Mirrors transformers' float32 arithmetic step by step (``modeling_rope_utils``), so
  imported models match at positions far beyond the original context.
  """
  f32 = np.float32
  exponents = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
  pos_freqs = np.power(f32(theta), exponents, dtype=f32)
  inv_freq = (f32(1.0) / pos_freqs).astype(f32)
  kind, factor = scaling.kind, scaling.factor
  if kind == 'none':
    return inv_freq, 1.0
  if kind == 'linear':
    return (inv_freq / f32(factor)).astype(f32), 1.0
  if kind == 'llama3':
    old = scaling.original_max_len
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = (f32(2 * math.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(old) / wavelen - f32(scaling.low_freq_factor))
              / f32(scaling.high_freq_factor - scaling.low_freq_factor)).astype(f32)
    smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32), 1.0
  if kind == 'yarn':
    attention = scaling.attention_factor or (
        0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
      return (head_dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi))
              / (2 * math.log(theta)))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001  # transformers: prevents the singularity.
    ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low),
                   0, 1).astype(f32)
    extrapolation = (1 - ramp).astype(f32)
    interp = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
    inv = (interp * (1 - extrapolation) + inv_freq * extrapolation).astype(f32)
    return inv, float(attention)
  raise ValueError(f'unknown rope scaling {kind!r}; use one of {ROPE_SCALINGS}.')


def rope_angles(positions_BL: jax.Array, inv_freq_K: np.ndarray | jax.Array,
                scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(sin, cos) tables ``[B, L, Dh/2]`` in float32, times ``scale`` (YaRN's factor)."""
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_K,
                                                                         jnp.float32)
  sin, cos = jnp.sin(angles_BLK), jnp.cos(angles_BLK)
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
  return sin, cos


def apply_rope(x_BLNH: jax.Array, sin_BLK: jax.Array, cos_BLK: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + Dh/2]) (the "rotate-half" convention of LLaMA/NeoX)."""
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin, cos = sin_BLK[:, :, None, :], cos_BLK[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)


# --------------------------------------------------------------------------- masks


def document_positions(segment_ids_BL: jax.Array) -> jax.Array:
  """Positions restarting at 0 at each segment change: ``[B, L]`` int32.

  For packed windows whose documents should see the positions they would have alone
  (needed with learned positions; RoPE attention depends only on differences).
  """
  L = segment_ids_BL.shape[-1]
  idx_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), segment_ids_BL.shape)
  starts_BL = jnp.concatenate(
      [jnp.ones_like(segment_ids_BL[:, :1], bool),
       segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
  start_idx_BL = jax.lax.cummax(jnp.where(starts_BL, idx_BL, 0), axis=1)
  return idx_BL - start_idx_BL


def attention_mask(q_idx_L: jax.Array, k_idx_S: jax.Array, *, causal: bool,
                   window: int | jax.Array = 0, mask_BS: jax.Array | None = None,
                   q_segment_BL: jax.Array | None = None,
                   k_segment_BS: jax.Array | None = None) -> jax.Array:
  """Boolean ``[B|1, 1, L, S]``: True where query ``l`` may attend to key ``s``.

  ``q_idx_L``/``k_idx_S`` are sequence indices (cache slots when decoding); ``window``
  may be a traced scalar (a per-layer window under ``nnx.scan``), 0 = no window.
  """
  diff_LS = q_idx_L[:, None] - k_idx_S[None, :]
  ok_LS = jnp.ones(diff_LS.shape, bool)
  if causal:
    ok_LS = diff_LS >= 0
  if not (isinstance(window, int) and window <= 0):
    dist_LS = diff_LS if causal else jnp.abs(diff_LS)
    ok_LS = ok_LS & ((dist_LS < window) | (window <= 0))
  ok = ok_LS[None, None]
  if mask_BS is not None:
    ok = ok & mask_BS.astype(bool)[:, None, None, :]
  if q_segment_BL is not None:
    ok = ok & (q_segment_BL[:, None, :, None] == k_segment_BS[:, None, None, :])
  return ok


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.warning('%s', message)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """How one attention call runs: ``jax.nn.dot_product_attention(q, k, v, **kwargs,
  implementation=implementation)``; ``fallback`` says why cuDNN was not used."""
  implementation: str
  kwargs: dict[str, Any]
  fallback: str | None = None


def plan_attention(implementation: str, *, causal: bool, seq_len: int,
                   window: int | jax.Array = 0, mask_BL: jax.Array | None = None,
                   segment_ids_BL: jax.Array | None = None) -> AttentionPlan:
  """Arguments of the attention core for a full (not cached) self-attention call.

  cuDNN (jax 0.10's ``implementation='cudnn'``) takes causal masking, a static
  left window and per-row valid lengths, but a boolean ``mask`` only of full
  ``[B, N, L, S]`` shape (a ``[B, 1, 1, S]`` padding mask fails with "Bias must have
  same seq length as QKV"). So:

  * padding ``mask_BL`` is folded into ``key_value_seq_lengths = sum(mask_BL)``. This
    assumes right padding (real tokens first), which is what every batch builder
    here produces; queries are not shortened (their padded rows are ignored
    downstream);
  * a window ``w`` becomes ``local_window_size=(w - 1, 0)`` (cuDNN's
    ``sliding_window_length = w``) when causal;
  * segment ids, a traced window, and a bidirectional window have no cuDNN form in
    jax's public API: XLA with the reason in ``fallback`` (logged once).

  XLA: ``is_causal`` alone, or one explicit boolean mask of everything present.
  """
  static_window = isinstance(window, (int, np.integer))
  has_window = not static_window or window > 0
  if implementation == 'cudnn':
    reason = None
    if segment_ids_BL is not None:
      reason = ('segment ids (document masking) have no form in the cuDNN arguments of '
                'jax.nn.dot_product_attention')
    elif has_window and not static_window:
      reason = 'a traced per-layer window (the caller switches over static windows)'
    elif has_window and not causal:
      reason = 'cuDNN takes only a left (causal) window'
    if reason is None:
      kwargs: dict[str, Any] = {'is_causal': causal}
      if mask_BL is not None:
        kwargs['key_value_seq_lengths'] = jnp.sum(mask_BL.astype(jnp.int32), axis=-1,
                                                  dtype=jnp.int32)
      if has_window:
        kwargs['local_window_size'] = (int(window) - 1, 0)
      return AttentionPlan('cudnn', kwargs)
    fallback = f'cuDNN attention falls back to XLA: {reason}.'
  else:
    fallback = None
  if mask_BL is None and segment_ids_BL is None and not has_window:
    return AttentionPlan('xla', {'is_causal': causal}, fallback)
  idx = jnp.arange(seq_len, dtype=jnp.int32)
  mask = attention_mask(idx, idx, causal=causal, window=window if has_window else 0,
                        mask_BS=mask_BL, q_segment_BL=segment_ids_BL,
                        k_segment_BS=segment_ids_BL)
  return AttentionPlan('xla', {'mask': mask}, fallback)


# --------------------------------------------------------------------------- module


class Attention(nnx.Module):
  """Self-attention with ``num_kv_heads`` K/V heads shared by groups of query heads.

  Parameters (``nnx.Einsum`` kernels):
    query ``[D, N, Dh]`` ('embed', 'heads', 'kv'); key, value ``[D, K, Dh]``
    ('embed', 'kv_heads', 'kv'); out ``[N, Dh, D]`` ('heads', 'kv', 'embed').
    With ``use_bias`` (GPT-2) each also has a ``bias`` of its output shape
    (``[N, Dh]``, ``[K, Dh]``, ``[D]``), zero-initialised.

  ``window_choices``: the distinct sliding windows of the model's layers (0 = full),
  so that a per-layer window traced under ``nnx.scan`` can be dispatched to a static
  cuDNN window by ``lax.switch``.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               causal: bool, use_rope: bool, implementation: str, init_std: float,
               out_init_std: float, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias: bool = False, projection_vjp: str = 'autodiff',
               window_choices: tuple[int, ...] = (0,)):
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
    self.window_choices = tuple(sorted(set(int(w) for w in window_choices)))

  def _core(self, q_BLNH, k_BLKH, v_BLKH, *, window, mask_BL, segment_ids_BL):
    """Full self-attention (no cache) with every mask applied."""
    if context_parallel.active(q_BLNH.shape[1]):  # Sequence split: ring / all-gather.
      return context_parallel.attention(
          q_BLNH, k_BLKH, v_BLKH, mask_fn=attention_mask, causal=self.causal, window=window,
          mask_BL=mask_BL, segment_ids_BL=segment_ids_BL)

    def run(window_value):
      plan = plan_attention(self.implementation, causal=self.causal,
                            seq_len=q_BLNH.shape[1], window=window_value, mask_BL=mask_BL,
                            segment_ids_BL=segment_ids_BL)
      if plan.fallback:
        _log_once(plan.fallback)
      return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, **plan.kwargs,
                                          implementation=plan.implementation)

    if (isinstance(window, (int, np.integer)) or self.implementation == 'xla'
        or segment_ids_BL is not None):
      return run(window)
    if len(self.window_choices) == 1:
      return run(self.window_choices[0])
    # A per-layer window traced under scan: one static cuDNN call per distinct window.
    choices = jnp.asarray(self.window_choices, jnp.int32)
    branch = jnp.argmax(choices == window)
    return jax.lax.switch(branch, [functools.partial(lambda w, _: run(w), w)
                                   for w in self.window_choices], None)

  def __call__(self, x_BLD: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
               mask_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None,
               window: int | jax.Array = 0,
               kv_cache: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns ``(out_BLD, new_kv_cache)``.

    Args:
      x_BLD: normed inputs.
      rope: ``(sin, cos)`` from :func:`rope_angles` (None: no rotary embedding).
      mask_BL: 1 for real tokens, 0 for padding; padded keys are not attended to.
      segment_ids_BL: int32 document ids; tokens attend only within their segment.
      window: sliding window of this layer (0 = full attention); an int, or a traced
        int32 scalar when the layers are scanned.
      kv_cache: this layer's ``(k, v)``, each ``[B, T_max, K, Dh]``; the new keys and
        values are written at ``cache_index`` and the queries attend to cache
        positions ``< cache_index + L`` (and ``<=`` their own position when causal,
        within the window).
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
      o_BLNH = self._core(q_BLNH, k_BLKH, v_BLKH, window=window, mask_BL=mask_BL,
                          segment_ids_BL=segment_ids_BL)
    else:
      if mask_BL is not None or segment_ids_BL is not None:
        raise NotImplementedError(
            'mask_BL or segment_ids_BL together with a KV cache is not supported.')
      cache_k, cache_v = kv_cache
      L, T = x_BLD.shape[1], cache_k.shape[1]
      cache_k = jax.lax.dynamic_update_slice_in_dim(
          cache_k, k_BLKH.astype(cache_k.dtype), cache_index, axis=1)
      cache_v = jax.lax.dynamic_update_slice_in_dim(
          cache_v, v_BLKH.astype(cache_v.dtype), cache_index, axis=1)
      new_cache = (cache_k, cache_v)
      key_pos_T = jnp.arange(T)
      query_pos_L = cache_index + jnp.arange(L)
      # Slots not yet written are beyond every query (causal) or masked explicitly.
      mask = attention_mask(query_pos_L, key_pos_T, causal=self.causal, window=window)
      if not self.causal:
        mask = mask & (key_pos_T < cache_index + L)[None, None, None, :]
      # The explicit [L, T] mask needs the XLA path (the cuDNN kernel takes only
      # causal/padding masks); decode steps are small, so this costs little.
      o_BLNH = jax.nn.dot_product_attention(
          q_BLNH, cache_k.astype(q_BLNH.dtype), cache_v.astype(q_BLNH.dtype), mask=mask,
          implementation='xla')
    o_BLNH = constrain(o_BLNH, ('batch', 'seq', 'act_heads', 'act_kv'))
    return self.out(o_BLNH), new_cache
