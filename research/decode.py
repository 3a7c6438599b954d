"""Autoregressive decoding with the KV cache: greedy, temperature and top-k sampling.

The prompt is prefilled in one forward pass that writes its keys/values into the
cache; then one token per step inside a ``jax.lax.fori_loop``. Everything runs in one
jitted function of ``(graphdef, state, prompt, rng)``, compiled once per
(model structure, batch, prompt length, number of new tokens, top_k, eos_id).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, greedy: bool,
                  temperature: jax.Array | float, top_k: int) -> jax.Array:
  """Next token ids ``[B]``: argmax when greedy, else softmax(logits / T) over the top k.

  ``top_k`` 0 keeps the whole vocabulary. Ties at the k-th logit keep all tied tokens.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'greedy',
                                             'top_k', 'eos_id'))
def _generate(graphdef, state, prompt_BP: jax.Array, rng: jax.Array,
              temperature: jax.Array, *, max_new_tokens: int, greedy: bool, top_k: int,
              eos_id: int | None) -> jax.Array:
  model = nnx.merge(graphdef, state)
  B, P = prompt_BP.shape
  sample = functools.partial(sample_logits, greedy=greedy, temperature=temperature,
                             top_k=top_k)

  cache = model.init_cache(B, P + max_new_tokens)
  logits_BPV, cache = model(prompt_BP, cache=cache)
  rng, sub = jax.random.split(rng)
  tok_B = sample(logits_BPV[:, -1], sub)
  done_B = jnp.zeros((B,), bool) if eos_id is None else tok_B == eos_id
  new_BN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(tok_B)

  # The weights ride in the loop carry (unchanged): NNX refuses to run a module whose
  # Variables hold tracers of an outer trace level inside its own nnx.scan.
  def step(i, carry):
    state, new_BN, cache, tok_B, done_B, rng = carry
    logits_B1V, cache = nnx.merge(graphdef, state)(tok_B[:, None], cache=cache)
    rng, sub = jax.random.split(rng)
    tok_B = sample(logits_B1V[:, 0], sub)
    if eos_id is not None:  # Finished rows keep emitting eos.
      tok_B = jnp.where(done_B, eos_id, tok_B)
      done_B = done_B | (tok_B == eos_id)
    new_BN = jax.lax.dynamic_update_slice_in_dim(new_BN, tok_B[:, None], i, axis=1)
    return state, new_BN, cache, tok_B, done_B, rng

  _, new_BN, *_ = jax.lax.fori_loop(1, max_new_tokens, step,
                                    (state, new_BN, cache, tok_B, done_B, rng))
  return jnp.concatenate([prompt_BP, new_BN], axis=1)


def generate(model: nnx.Module, prompt_tokens_BP, *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None) -> np.ndarray:
  """Continues equal-length prompts ``[B, P]``; returns prompt + new tokens ``[B, P+N]``.

  ``temperature`` 0 is greedy (``rng`` unused); otherwise tokens are sampled from
  ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely when
  ``top_k > 0``. After a row emits ``eos_id`` the rest of that row is ``eos_id``.
  The model runs deterministically (no dropout).
  """
  prompt_BP = jnp.asarray(prompt_tokens_BP, jnp.int32)
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0:
    raise ValueError(f'prompt_tokens_BP must be [batch, prompt_len>0], got {prompt_BP.shape}.')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}.')
  total = prompt_BP.shape[1] + max_new_tokens
  max_len = getattr(model, 'max_seq_len', None)
  if max_len is not None and total > max_len:
    raise ValueError(
        f'prompt ({prompt_BP.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} '
        f'exceeds model.max_seq_len={max_len}; shorten them.')
  greedy = temperature == 0.0
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  tokens_BT = _generate(graphdef, state, prompt_BP, rng, jnp.float32(max(temperature, 1e-6)),
                        max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=int(top_k),
                        eos_id=None if eos_id is None else int(eos_id))
  return np.asarray(tokens_BT)
