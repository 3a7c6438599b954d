"""Optimizer chain, schedules and regex parameter rules."""

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest

from research.config import ConfigError, base_config
from research.optim import make_optimizer, make_schedule, regex_mask


def test_no_decay_mask_by_regex():
  params = {'embed': {'embedding': 1.0}, 'blocks': {'attn': {'query': {'kernel': 1.0}},
            'attn_norm': {'scale': 1.0}}}
  mask = regex_mask(params, base_config().optimizer.no_decay_regex, match=False)
  assert mask == {'embed': {'embedding': False}, 'blocks': {'attn': {'query': {'kernel': True}},
                  'attn_norm': {'scale': False}}}


def test_cosine_schedule_closed_form():
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio = 1.0, 10, 0.1
  s = make_schedule(o, 110)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  # Halfway through the decay: floor + (peak - floor) * 0.5.
  np.testing.assert_allclose(float(s(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)


def test_weight_decay_skips_masked_params():
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.weight_decay, o.clip_norm = 0.1, 0, 0.5, 0.0
  o.schedule = 'constant'
  tx, _ = make_optimizer(o, 10)
  params = {'norm': {'scale': jnp.ones(3)}, 'dense': {'kernel': jnp.ones(3)}}
  zeros = {'norm': {'scale': jnp.zeros(3)}, 'dense': {'kernel': jnp.zeros(3)}}
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates['norm']['scale']).max()) == 0.0
  assert float(updates['dense']['kernel'][0]) < 0.0


def test_bad_optimizer_values():
  o = base_config().optimizer
  o.schedule = 'cosinee'
  with pytest.raises(ConfigError, match='optimizer.schedule'):
    make_schedule(o, 10)


@pytest.mark.parametrize('name, step, expected', [
    # peak 1, warmup 10, 110 steps, floor 0.1.
    ('constant', 50, 1.0),
    ('linear', 60, 1.0 - 0.9 * 50 / 100),
    ('linear', 110, 0.1),
    ('inverse_sqrt', 10, 1.0),
    ('inverse_sqrt', 30, np.sqrt(10 / 30)),
    # wsd: decay over the last 20% (22 steps) -> stable until step 88.
    ('wsd', 88, 1.0),
    ('wsd', 99, 0.1 + 0.9 * 0.5),
    ('wsd', 110, 0.1),
])
def test_schedule_closed_forms(name, step, expected):
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio, o.schedule = 1.0, 10, 0.1, name
  s = make_schedule(o, 110)
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)  # Warmup is shared.
  np.testing.assert_allclose(float(s(step)), expected, rtol=1e-5)


@pytest.mark.parametrize('shape, t, frac', [('cosine', 0.5, 0.5), ('sqrt', 0.25, 0.5)])
def test_wsd_decay_shapes(shape, t, frac):
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio = 1.0, 0, 0.0
  o.schedule, o.wsd_decay_shape, o.wsd_decay_fraction = 'wsd', shape, 0.5
  s = make_schedule(o, 100)
  np.testing.assert_allclose(float(s(50 + 50 * t)), frac, rtol=1e-5)


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'lion', 'sgd', 'muon'])
def test_every_optimizer_reduces_a_quadratic(name):
  o = base_config().optimizer
  o.name, o.learning_rate, o.warmup_steps, o.schedule = name, 0.05, 0, 'constant'
  tx, _ = make_optimizer(o, 100)
  params = {'w': jnp.full((4, 4), 2.0)}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p['w'] ** 2)
  start = loss(params)
  for _ in range(20):
    g = jax.grad(loss)(params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < start


def test_frozen_params_get_no_update_and_no_state():
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.frozen_regex = 0.1, 0, '^backbone/'
  tx, _ = make_optimizer(o, 10)
  params = {'backbone': {'kernel': jnp.ones(3)}, 'head': {'kernel': jnp.ones(3)}}
  state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'size') and x.ndim > 0)
  assert n_state == 2 * 3  # Adam mu and nu for the head only.
  g = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(g, state, params)
  assert float(jnp.abs(updates['backbone']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['head']['kernel']).max()) > 0.0


def test_lr_multipliers_scale_matching_updates():
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.weight_decay, o.clip_norm = 0.1, 0, 0.0, 0.0
  o.name, o.schedule, o.lr_multipliers = 'sgd', 'constant', (('head', 10.0),)
  o.momentum = 0.0
  tx, _ = make_optimizer(o, 10)
  params = {'body': jnp.ones(2), 'head': jnp.ones(2)}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['body'], -0.1)
  np.testing.assert_allclose(updates['head'], -1.0, rtol=1e-6)
