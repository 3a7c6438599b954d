"""Optimizer chain, schedules and regex parameter rules."""

import os

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


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'lion', 'sgd', 'muon'])
def test_every_optimizer_decays_only_unmasked_params(name):
  """Zero gradients: the update is the weight decay alone, skipped by no_decay_regex."""
  o = base_config().optimizer
  o.name, o.learning_rate, o.warmup_steps, o.weight_decay = name, 0.1, 0, 0.5
  o.schedule, o.clip_norm = 'constant', 0.0
  tx, _ = make_optimizer(o, 10)
  params = {'norm': {'scale': jnp.ones((4,))}, 'mlp': {'wi': {'kernel': jnp.ones((4, 4))}}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates['norm']['scale']).max()) == 0.0
  assert float(updates['mlp']['wi']['kernel'].max()) < 0.0


def test_muon_orthogonalises_stacked_matrices_and_leaves_the_rest_to_adam():
  """Scanned [layers, in, out] and per-head kernels are Muon matrices; embeddings and
  norm scales (2-D too) are not (optax's default rule would pick exactly those)."""
  from research.optim import muon_dimension_numbers
  o = base_config().optimizer
  o.name, o.learning_rate, o.warmup_steps, o.schedule = 'muon', 1.0, 0, 'constant'
  o.clip_norm, o.weight_decay = 0.0, 0.0
  k = jax.random.split(jax.random.key(0), 4)
  params = {'embed': {'embedding': jnp.ones((16, 8))},
            'blocks': {'attn_norm': {'scale': jnp.ones((2, 8))},
                       'attn': {'query': {'kernel': jnp.ones((2, 8, 2, 4))},
                                'out': {'kernel': jnp.ones((2, 2, 4, 8))}},
                       'mlp': {'wi': {'kernel': jnp.ones((2, 8, 16))}}}}
  dims = muon_dimension_numbers(params)
  assert dims['embed']['embedding'] is None and dims['blocks']['attn_norm']['scale'] is None
  assert dims['blocks']['mlp']['wi']['kernel'].reduction_axis == (-2,)
  assert dims['blocks']['attn']['out']['kernel'].reduction_axis == (-3, -2)
  grads = {'embed': {'embedding': jax.random.normal(k[0], (16, 8))},
           'blocks': {'attn_norm': {'scale': jax.random.normal(k[1], (2, 8))},
                      'attn': {'query': {'kernel': jax.random.normal(k[2], (2, 8, 2, 4))},
                               'out': {'kernel': jax.random.normal(k[2], (2, 2, 4, 8))}},
                      'mlp': {'wi': {'kernel': jax.random.normal(k[3], (2, 8, 16))}}}}
  tx, _ = make_optimizer(o, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -c * sign(g): the same magnitude for every entry (c = 1.47
  # with optax muon's Nesterov Adam), unlike Muon's orthogonalised matrix.
  ratio = np.asarray(updates['embed']['embedding'] / -np.sign(grads['embed']['embedding']))
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
  assert ratio.flat[0] > 0
  for layer in range(2):  # Each layer's matrix separately: near-equal singular values.
    for u in (updates['blocks']['mlp']['wi']['kernel'][layer],
              updates['blocks']['attn']['query']['kernel'][layer].reshape(8, 8)):
      s = np.linalg.svd(np.asarray(u), compute_uv=False)
      assert s.max() / s.min() < 2.0, s  # Newton-Schulz (5 steps): s in ~[0.7, 1.2].


def test_schedule_with_batch_ramp_lr_scaling():
  """run_schedule (what the trainer and plot use) = schedule x (b / batch_size)^p."""
  from tests.helpers import smoke_config
  from research.optim import run_schedule
  c = smoke_config(steps=20, batch_size=32, **{
      'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
      'optimizer.learning_rate': 1.0, 'batch_ramp.boundaries': (5, 10),
      'batch_ramp.batch_sizes': (8, 16), 'batch_ramp.lr_scaling': 'linear'})
  out = run_schedule(c)
  assert list(out['batch_size'][[0, 4, 5, 9, 10, 19]]) == [8, 8, 16, 16, 32, 32]
  np.testing.assert_allclose(out['learning_rate'][[4, 5, 9, 10]], [0.25, 0.5, 0.5, 1.0])
  assert out['tokens_seen'][-1] == (5 * 8 + 5 * 16 + 10 * 32) * c.seq_len
  c.batch_ramp.lr_scaling = 'sqrt'
  np.testing.assert_allclose(run_schedule(c)['learning_rate'][[0, 5, 10]],
                             [0.5, 0.5 ** 0.5, 1.0], rtol=1e-6)


@pytest.mark.parametrize('name, step, expected', [
    # decay_steps=60 < steps=110: the decay ends at step 60 and stays at the floor.
    ('cosine', 35, 0.1 + 0.9 * 0.5),
    ('cosine', 90, 0.1),
    ('linear', 35, 1.0 - 0.9 * 0.5),
    ('linear', 100, 0.1),
    # wsd: the last 20% of decay_steps (12) decay: stable to 48, sqrt shape, floor after.
    ('wsd', 48, 1.0),
    ('wsd', 51, 0.1 + 0.9 * (1 - np.sqrt(0.25))),
    ('wsd', 100, 0.1),
])
def test_schedules_with_decay_steps_before_the_end(name, step, expected):
  o = base_config().optimizer
  o.learning_rate, o.warmup_steps, o.min_lr_ratio, o.schedule = 1.0, 10, 0.1, name
  o.decay_steps, o.wsd_decay_shape = 60, 'sqrt'
  np.testing.assert_allclose(float(make_schedule(o, 110)(step)), expected, rtol=1e-5)


def test_plot_schedule_cli_writes_png(tmp_path):
  from tests.helpers import run_cli
  out = tmp_path / 'lr.png'
  r = run_cli(['launch.plot_schedule', '--config=experiments/pretrain/schedules.py',
               '--compare=cosine,wsd', '--config.batch_ramp.boundaries=(50,100)',
               '--config.batch_ramp.batch_sizes=(4,8)', '--config.batch_ramp.lr_scaling=sqrt',
               f'--out={out}'])
  assert r.returncode == 0, r.stderr[-2000:]
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'wsd: lr at step' in r.stdout and '400: 0' in r.stdout
  r = run_cli(['launch.plot_schedule', '--config=experiments/pretrain/schedules.py',
               '--config.optimizer.schedule=cosin', f'--out={out}'])
  assert r.returncode == 1 and r.stderr.startswith('error: optimizer.schedule'), r.stderr


def test_schedule_sweep_smoke(tmp_path):
  """The schedule ablation end to end at smoke size (cosine vs WSD at one peak LR)."""
  import json
  from experiments.pretrain import schedules
  from tests.helpers import run_cli
  entries = schedules.sweep()
  assert len(entries) == len(schedules.SCHEDULES) * len(schedules.PEAK_LRS) + 1
  picks = [i for i, e in enumerate(entries) if e['optimizer.learning_rate'] == 3e-3
           and e['optimizer.schedule'] in ('cosine', 'wsd')]
  # The two runs share their init and eval programs: a persistent XLA cache saves those.
  cache = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'xla_cache'),
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  r = run_cli(['launch.sweep', '--config=experiments/pretrain/schedules.py:smoke=True',
               f'--workdir={tmp_path}', *[f'--only={i}' for i in picks]], env=cache)
  assert r.returncode == 0, r.stderr[-3000:]
  md = (tmp_path / 'results.md').read_text()
  assert 'optimizer.schedule' in md and '`wsd`' in md and '`cosine`' in md
  plan = json.load(open(tmp_path / 'sweep.json'))
  for i in picks:
    summary = json.load(open(os.path.join(plan['runs'][i]['workdir'], 'summary.json')))
    assert summary['final_eval_loss'] is not None
