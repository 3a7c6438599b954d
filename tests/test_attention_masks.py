"""Attention masks that compose (causal, padding, sliding window, documents) on the XLA
path, and the cuDNN dispatch decided at shape level on CPU."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ConfigError
from research.models import attention as attn_lib
from research.models.transformer import layer_windows, validate_model_config
from tests.test_model import VOCAB, build, copy_scanned_into_list, forward, tiny_cfg, tokens


def _reference_mask(L, *, causal, window, pad_BL=None, seg_BL=None, B=2):
  """Brute-force [B, 1, L, L] mask from the definitions in attention.py's docstring."""
  out = np.zeros((B, 1, L, L), bool)
  for b, i, j in itertools.product(range(B), range(L), range(L)):
    ok = (j <= i) if causal else True
    if window:
      ok &= (i - j < window) if causal else abs(i - j) < window
    if pad_BL is not None:
      ok &= bool(pad_BL[b, j])
    if seg_BL is not None:
      ok &= seg_BL[b, i] == seg_BL[b, j]
    out[b, 0, i, j] = ok
  return out


@pytest.mark.parametrize('causal,window,pad,seg', [
    (True, 3, False, False), (True, 0, True, False), (True, 4, True, True),
    (False, 2, True, False), (False, 0, False, True), (True, 0, False, True)])
def test_xla_mask_composes_every_rule(causal, window, pad, seg):
  L = 9
  pad_BL = np.ones((2, L), np.int32)
  pad_BL[1, 6:] = 0
  seg_BL = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [1, 1, 1, 1, 2, 2, 0, 0, 0]], np.int32)
  plan = attn_lib.plan_attention('xla', causal=causal, seq_len=L, window=window,
                                 mask_BL=jnp.asarray(pad_BL) if pad else None,
                                 segment_ids_BL=jnp.asarray(seg_BL) if seg else None)
  want = _reference_mask(L, causal=causal, window=window, pad_BL=pad_BL if pad else None,
                         seg_BL=seg_BL if seg else None)
  got = np.broadcast_to(np.asarray(plan.kwargs['mask']), want.shape)
  np.testing.assert_array_equal(got, want)
  assert plan.implementation == 'xla' and plan.fallback is None
  # A traced window (per-layer, under scan) builds the same mask.
  traced = jax.jit(lambda w: attn_lib.plan_attention(
      'xla', causal=causal, seq_len=L, window=w,
      mask_BL=jnp.asarray(pad_BL) if pad else None,
      segment_ids_BL=jnp.asarray(seg_BL) if seg else None).kwargs['mask'])(window)
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(traced), want.shape), want)


def test_cudnn_plan_folds_padding_and_window_and_falls_back_for_segments():
  mask_BL = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
  plan = attn_lib.plan_attention('cudnn', causal=True, seq_len=8, mask_BL=mask_BL)
  assert plan.implementation == 'cudnn' and plan.fallback is None
  assert 'mask' not in plan.kwargs and plan.kwargs['is_causal'] is True
  lens = plan.kwargs['key_value_seq_lengths']
  assert lens.dtype == jnp.int32 and lens.shape == (2,) and list(lens) == [8, 5]

  plan = attn_lib.plan_attention('cudnn', causal=True, seq_len=8, window=4)
  assert plan.kwargs == {'is_causal': True, 'local_window_size': (3, 0)}

  seg = jnp.ones((2, 8), jnp.int32)
  for kwargs, why in ((dict(causal=True, segment_ids_BL=seg), 'segment ids'),
                      (dict(causal=False, window=4), 'left'),
                      (dict(causal=True, window=jnp.int32(4)), 'traced')):
    plan = attn_lib.plan_attention('cudnn', seq_len=8, **kwargs)
    assert plan.implementation == 'xla' and why in plan.fallback
    assert plan.kwargs['mask'].dtype == jnp.bool_


def test_cudnn_dispatch_of_a_model_gives_the_xla_logits(monkeypatch):
  """A model set to cuDNN (padding, per-layer windows under scan, segment ids) asks the
  core for arguments whose XLA evaluation equals the XLA model: the cuDNN kernel's own
  numerics are the only thing left untested on CPU."""
  real = jax.nn.dot_product_attention
  calls = []

  def fake(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
    calls.append((implementation, mask is None, sorted(kw)))
    return real(q, k, v, bias, mask, implementation='xla', **kw)

  model = build(sliding_window=3, window_layers='LG', num_kv_heads=2)
  x = tokens(length=12)
  pad = jnp.ones_like(x).at[1, 8:].set(0)
  f = nnx.jit(lambda m, t, p: m(t, mask_BL=p))
  want = f(model, x, pad)
  model.blocks.attn.implementation = 'cudnn'
  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  got = f(model, x, pad)
  np.testing.assert_allclose(got[:, :8], want[:, :8], atol=1e-5)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  cudnn_calls = [c for c in calls if c[0] == 'cudnn']
  # lax.switch traces one branch per distinct window (0 and 3), none with a mask.
  assert len(cudnn_calls) == 2 and all(no_mask for _, no_mask, _ in cudnn_calls)
  assert any('local_window_size' in kw for *_, kw in cudnn_calls)
  assert all('key_value_seq_lengths' in kw for *_, kw in cudnn_calls)

  calls.clear()
  seg = jnp.ones_like(x).at[:, 5:].set(2)
  g = nnx.jit(lambda m, t, s: m(t, segment_ids_BL=s))
  got = g(model, x, seg)
  model.blocks.attn.implementation = 'xla'
  np.testing.assert_allclose(got, g(model, x, seg), atol=1e-5)
  assert calls and all(impl == 'xla' for impl, *_ in calls)


@pytest.mark.parametrize('positions,restart', [('rope', True), ('rope', False),
                                               ('learned', True)])
def test_packed_second_document_equals_the_document_alone(positions, restart):
  model = build(positions=positions)
  doc_a, doc_b = tokens(length=7, seed=1), tokens(length=9, seed=2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.concatenate([jnp.ones((2, 7), jnp.int32), jnp.full((2, 9), 2, jnp.int32)], 1)
  pos = attn_lib.document_positions(seg) if restart else None
  if restart:
    np.testing.assert_array_equal(pos[0], list(range(7)) + list(range(9)))
  f = nnx.jit(lambda m, t, s, p: m(t, segment_ids_BL=s, positions_BL=p))
  got = f(model, packed, seg, pos)
  alone = forward(model, doc_b)
  np.testing.assert_allclose(got[:, 7:], alone, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[:, :7], forward(model, doc_a), atol=1e-5, rtol=0)
  # Without the segment ids the second document does see the first.
  assert not np.allclose(forward(model, packed)[:, 7:], alone, atol=1e-3)


def test_sliding_window_limits_what_a_token_sees():
  model = build(sliding_window=4)
  x = tokens(length=12)
  x2 = x.at[:, 2].set((x[:, 2] + 1) % VOCAB)
  a, b = forward(model, x), forward(model, x2)
  # Two layers of window 4: position 2 reaches at most position 2 + 2 * 3 = 8.
  np.testing.assert_array_equal(a[:, :2], b[:, :2])
  assert not np.allclose(a[:, 8], b[:, 8])
  np.testing.assert_allclose(a[:, 9:], b[:, 9:], atol=1e-6)
  # A window as long as the sequence is full attention.
  full = build(sliding_window=0)
  np.testing.assert_allclose(forward(build(sliding_window=12), x), forward(full, x), atol=1e-6)
  assert not np.allclose(a, forward(full, x), atol=1e-3)


def test_per_layer_windows_scanned_equal_unscanned():
  kw = dict(sliding_window=3, window_layers='GL', num_layers=3)
  assert layer_windows(tiny_cfg(**kw)) == (0, 3, 0)
  scanned, listed = build(seed=0, **kw), build(seed=1, scan_layers=False, **kw)
  copy_scanned_into_list(scanned, listed)
  x = tokens(length=12)
  np.testing.assert_allclose(forward(scanned, x), forward(listed, x), atol=1e-5)
  # And the pattern matters: all-local differs.
  allocal = build(seed=0, sliding_window=3, num_layers=3)
  assert not np.allclose(forward(allocal, x), forward(scanned, x), atol=1e-3)


@pytest.mark.parametrize('overrides,match', [
    (dict(sliding_window=-1), 'model.sliding_window'),
    (dict(window_layers='LX', sliding_window=4), 'model.window_layers'),
    (dict(window_layers='LG'), 'needs model.sliding_window'),
    (dict(window_layers='LGL', sliding_window=4), 'more letters than'),
    (dict(rope_scaling='ntk'), 'model.rope_scaling'),
    (dict(rope_scaling='llama3', rope_factor=8.0), 'rope_original_max_len'),
    (dict(rope_scaling='llama3', rope_factor=8.0, rope_original_max_len=64,
          rope_low_freq_factor=4.0, rope_high_freq_factor=1.0), 'low < high'),
    (dict(rope_scaling='linear', positions='learned'), "positions='rope'"),
])
def test_mask_and_rope_config_errors_name_the_key(overrides, match):
  with pytest.raises(ConfigError, match=match):
    validate_model_config(tiny_cfg(**overrides))
