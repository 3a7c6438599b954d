"""The chunked loss equals the plain one, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from research.models.loss import chunked_lm_loss, lm_loss


def test_chunked_loss_matches_full_loss_and_grads():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (2, 16, 8))
  w = jax.random.normal(k2, (8, 300)) * 0.3
  t = jax.random.randint(k3, (2, 16), 0, 300)
  m = jnp.ones((2, 16)).at[1, 10:].set(0.0)
  project = lambda x, w: x @ w

  def full(h, w):
    return lm_loss(project(h, w), t, m, 1e-4)[0]

  def chunked(h, w):
    return chunked_lm_loss(h, lambda x: project(x, w), t, m, 1e-4, chunk_size=4)[0]

  np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-6)
  g_full, g_chunk = jax.grad(full, (0, 1))(h, w), jax.grad(chunked, (0, 1))(h, w)
  for a, b in zip(g_full, g_chunk):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lm_objective_chunked_through_the_model():
  from flax import nnx
  from research.models.transformer import Transformer
  from research.tasks import lm
  from tests.helpers import smoke_config
  c = smoke_config(**{'model.vocab_size': 259})
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 3, 259)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': jnp.ones((2, 32))}
  plain, _ = lm.make_task(c).objective(model, batch, True)
  c.loss.chunk_size = 8  # The task's forward returns hidden states, its loss applies the head.
  chunked, _ = lm.make_task(c).objective(model, batch, True)
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)
