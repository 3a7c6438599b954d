"""KV-cache decoding: cached steps match full forwards (sliding windows included); greedy
and top-k generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.decode import generate
from tests.test_model import VOCAB, build, forward, tokens


@nnx.jit
def cached_step(model, tokens_BL, cache):
  return model(tokens_BL, cache=cache)


@pytest.mark.parametrize('overrides', [
    dict(scan_layers=True, num_kv_heads=2),
    dict(scan_layers=False, num_kv_heads=2),
    dict(scan_layers=True, num_kv_heads=1, positions='learned', tie_embeddings=False),
    # Sliding windows (3 < 12 tokens): one for all layers, and per layer under scan.
    dict(scan_layers=False, num_kv_heads=2, sliding_window=3),
    dict(scan_layers=True, num_kv_heads=2, sliding_window=3, window_layers='LG'),
])
def test_prefill_and_incremental_steps_match_full_forward(overrides):
  model = build(**overrides)
  x = tokens(length=12)
  full = forward(model, x)
  cache = model.init_cache(batch_size=2, max_len=16)
  assert cache['k'].shape == (2, 2, 16, overrides['num_kv_heads'], 8)
  logits, cache = cached_step(model, x[:, :5], cache)
  steps = [logits]
  for i in range(5, 12):
    logits, cache = cached_step(model, x[:, i:i + 1], cache)
    steps.append(logits)
  assert int(cache['index']) == 12
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_greedy_generate_equals_repeated_full_forward():
  model = build()
  prompt = np.asarray(tokens(length=4, seed=3))
  out = generate(model, prompt, max_new_tokens=6)
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(out[:, :4], prompt)
  # Full forwards over a fixed-length buffer (one compile): causal attention makes the
  # not-yet-written tail irrelevant to the logits at position t - 1.
  seq = jnp.zeros((2, 10), jnp.int32).at[:, :4].set(prompt)
  for t in range(4, 10):
    nxt = jnp.argmax(forward(model, seq)[:, t - 1], axis=-1).astype(jnp.int32)
    seq = seq.at[:, t].set(nxt)
  np.testing.assert_array_equal(out, np.asarray(seq))


def test_top_k_1_sampling_equals_greedy_and_sampling_varies():
  model = build()
  prompt = np.asarray(tokens(length=4, seed=3))
  greedy = generate(model, prompt, max_new_tokens=6)
  top1 = generate(model, prompt, max_new_tokens=6, rng=jax.random.key(7), temperature=0.9,
                  top_k=1)
  np.testing.assert_array_equal(greedy, top1)
  hot = [generate(model, prompt, max_new_tokens=6, rng=jax.random.key(s), temperature=5.0,
                  top_k=10) for s in range(3)]
  assert any(not np.array_equal(hot[0], h) for h in hot[1:])
  assert all(int(h.max()) < VOCAB and int(h.min()) >= 0 for h in hot)


def test_eos_fills_the_rest_of_the_row():
  model = build()
  prompt = np.asarray(tokens(length=4, seed=3))
  greedy = generate(model, prompt, max_new_tokens=6)
  eos = int(greedy[0, 4])  # Row 0 emits it first.
  out = generate(model, prompt, max_new_tokens=6, eos_id=eos)
  np.testing.assert_array_equal(out[0, 4:], eos)


def test_generate_refuses_sequences_longer_than_the_model():
  with pytest.raises(ValueError, match='exceeds model.max_seq_len=32'):
    generate(build(), np.zeros((1, 30), np.int32), max_new_tokens=5)
