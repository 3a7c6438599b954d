"""Batch strategies: gradient accumulation equivalence and the batch-size ramp."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import batch_ramp
from research.config import ConfigError
from tests.helpers import run_cli, smoke_config

# Float32 tolerance of "the same update". Accumulation only reorders float32 sums (k
# partial gradients added vs one reduction over the batch):
# * SGD (update = -lr * grad): rtol 1e-5, plus an absolute floor of 1e-5 x the largest
#   update entry (entries that are sums of cancelling terms have no relative accuracy).
# * AdamW (3 steps): Adam divides by sqrt(v), which turns those near-zero gradient
#   entries' rounding into O(lr) relative noise; we allow |difference| <= 1e-3 * lr per
#   step (seen: 3e-5 * lr per step on the attention key kernel at init, and 5.6e-4 * lr
#   per step on one of 4,096 wi_0 entries, 2026-12-03, with the model and sharding rules
#   of the MoE/pipeline/context-parallel round). A wrong accumulation (e.g.
#   weighting micro-batches instead of tokens) moves most entries by a good part of lr.
RTOL = 1e-5
ATOL_FRACTION = 1e-5
ADAM_ATOL_PER_STEP = 1e-3


def _rows(workdir, split='train'):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


# ------------------------------------------------------------- gradient accumulation


def _updates(config, batch, accum_steps_list, n_updates=1):
  """Initial params, and params after ``n_updates`` train_step calls per accum setting."""
  from flax import nnx
  from research import sharding as shd
  from research.tasks import make_task
  from research.step import train_step
  from research.train_state import create_train_state
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  task = make_task(config)
  ts = create_train_state(config, mesh, task)
  params = lambda state: jax.device_get(
      nnx.state(nnx.merge(ts.graphdef, state)[0], nnx.Param))
  results = []
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    for k in accum_steps_list:
      step = jax.jit(functools.partial(train_step, ts.graphdef, objective=task.objective,
                                       accum_steps=k, wrt=task.trainable))
      state, losses = ts.state, []  # Not donated: every setting starts from ts.state.
      for _ in range(n_updates):
        state, out = step(state, batch)
        losses.append(float(out['loss']))
      results.append((params(state), losses))
  return params(ts.state), results


def _batch(b, seq_len, vocab, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, vocab, (b, seq_len + 1)).astype(np.int32)
  mask = np.ones((b, seq_len), np.float32)
  # Uneven real tokens per micro-batch (rows i, i+k, ... form micro-batch i): the
  # weighting by tokens, not by micro-batch, is what makes accumulation exact.
  mask[0, seq_len // 4:] = 0.0
  mask[5, :] = 0.0
  mask[2, 3:] = 0.0
  return {'inputs': jnp.asarray(toks[:, :-1]), 'targets': jnp.asarray(toks[:, 1:]),
          'mask': jnp.asarray(mask)}


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_grad_accumulation_equals_the_large_batch(name):
  """k=4 micro-batches of 4 == one batch of 16: same loss, same parameter update."""
  # SGD (no momentum, no clipping): the update is -lr * grad, linear in the gradient;
  # lr=100 makes it large next to the params, so p_new - p_old is not lost to rounding.
  sgd = name == 'sgd'
  c = smoke_config(**{'model.vocab_size': 64, 'optimizer.name': name,
                      'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                      'optimizer.learning_rate': 100.0 if sgd else 1e-2,
                      'optimizer.momentum': 0.0, 'optimizer.clip_norm': 0.0 if sgd else 1.0})
  batch = _batch(16, c.seq_len, 64)
  n = 1 if sgd else 3
  p0, [(big, loss_big), (acc, loss_acc)] = _updates(c, batch, (1, 4), n_updates=n)
  np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-6)
  for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(acc),
                             jax.tree.leaves(big), jax.tree.leaves(p0)):
    upd_a, upd_b = a - p, b - p
    atol = (ATOL_FRACTION * float(np.abs(upd_b).max()) if sgd else
            ADAM_ATOL_PER_STEP * c.optimizer.learning_rate * n)
    np.testing.assert_allclose(upd_a, upd_b, rtol=RTOL, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------ the ramp


def _ramp_config(**kw):
  return smoke_config(**{
      'steps': 8, 'log_every': 1, 'eval_steps': 0, 'checkpoint_every': 100,
      'num_samples': 0, 'batch_size': 64, 'batch_ramp.boundaries': (3, 5),
      'batch_ramp.batch_sizes': (16, 32), 'batch_ramp.lr_scaling': 'sqrt',
      'optimizer.grad_accum_steps': 2, **kw})


def test_ramp_unit_rules():
  r = batch_ramp.BatchRamp.from_config(_ramp_config())
  assert [r.batch_size(s) for s in range(1, 9)] == [16, 16, 16, 32, 32, 64, 64, 64]
  assert r.unit == 16
  assert [r.tokens_through(s, 1) for s in range(0, 9)] == [
      0, 16, 32, 48, 80, 112, 176, 240, 304]
  f = r.lr_factor()
  np.testing.assert_allclose([float(f(c)) for c in (0, 2, 3, 4, 5, 100)],
                             [0.5, 0.5, 0.5 ** 0.5, 0.5 ** 0.5, 1.0, 1.0], rtol=1e-6)
  assert batch_ramp.BatchRamp.from_config(smoke_config()).lr_factor() is None
  assert r.new_size_in(4, 4) and r.new_size_in(2, 6) and not r.new_size_in(7, 8)
  assert batch_ramp.linear_ramp(32, 512, 100, 4, multiple_of=32) == (
      (25, 50, 75, 100), (32, 128, 256, 384))


@pytest.mark.parametrize('overrides, needle', [
    ({'batch_ramp.batch_sizes': (16,)}, 'batch_ramp.boundaries'),
    ({'batch_ramp.boundaries': (5, 3)}, 'increase strictly'),
    ({'batch_ramp.boundaries': (3, 8)}, 'below steps=8'),
    ({'batch_ramp.lr_scaling': 'cubic'}, 'batch_ramp.lr_scaling'),
    ({'batch_ramp.batch_sizes': (0, 32)}, 'positive'),
    ({'batch_ramp.batch_sizes': (8, 32)}, 'multiples of 16'),  # 2 micro x 8 shards.
])
def test_ramp_validation_names_the_key(overrides, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    batch_ramp.validate(_ramp_config(**overrides), {'data': 8, 'fsdp': 1}, 1)
  assert '\n' not in str(e.value)


def test_ramp_batches_concatenate_the_same_token_stream():
  """Unit batches concatenated == the fixed-batch stream: the ramp only regroups it."""
  from research.data import pipeline, tokenizers
  c = _ramp_config()
  tok = tokenizers.make_tokenizer(c.data, None)
  r = batch_ramp.BatchRamp.from_config(c)
  ramped = pipeline.make_lm_iterator(c, tok, 'train', batch_size_per_process=r.unit)
  flat = pipeline.make_lm_iterator(c, tok, 'train', batch_size_per_process=16)
  got = np.concatenate([r.next_batch(ramped, s)['inputs'] for s in range(1, 7)])
  want = np.concatenate([next(flat)['inputs'] for _ in range(len(got) // 16)])
  np.testing.assert_array_equal(got, want)


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent XLA cache for this test only: the resumed run's programs are the
  uninterrupted run's, so it loads them instead of compiling (~10x less CPU)."""
  from jax._src import compilation_cache
  keys = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
          'jax_persistent_cache_min_entry_size_bytes')
  old = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(tmp_path / 'xla_cache'), 0.0, 0)):
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_ramp_end_to_end_compiles_once_per_size_and_resumes_exactly(tmp_path, monkeypatch,
                                                                     compile_cache):
  """Batch 16 -> 32 -> 64 at steps 3 and 5 (LR x sqrt(b/64), 2 micro-batches each):
  rows carry the real batch sizes, tokens add up, one trace per size, and a run
  stopped at the boundary (step 3) and resumed equals the uninterrupted run bitwise."""
  from research import recipe
  from research import step as step_lib
  from research.optim import make_schedule
  traced = []
  real_step = step_lib.train_step

  def counting_step(graphdef, state, batch, **kw):
    traced.append(batch['inputs'].shape[0])  # Runs once per trace (= per compile).
    return real_step(graphdef, state, batch, **kw)

  monkeypatch.setattr(step_lib, 'train_step', counting_step)
  c = _ramp_config()
  full = str(tmp_path / 'full')
  summary = recipe.run(c, full)
  assert traced == [16, 32, 64], traced

  rows = _rows(full)
  sizes = [16, 16, 16, 32, 32, 64, 64, 64]
  assert [r['step'] for r in rows] == list(range(1, 9))
  assert [r['batch_size'] for r in rows] == sizes
  assert [r['tokens_seen'] for r in rows] == list(np.cumsum(sizes) * c.seq_len)
  assert summary['tokens_seen'] == sum(sizes) * c.seq_len
  base = make_schedule(c.optimizer, c.steps)
  want_lr = [float(base(s - 1)) * np.sqrt(b / 64) for s, b in zip(range(1, 9), sizes)]
  np.testing.assert_allclose([r['learning_rate'] for r in rows], want_lr, rtol=1e-6)

  traced.clear()
  parts = str(tmp_path / 'parts')
  assert recipe.run(c, parts, stop_at_step=3)['stopped_at_step'] == 3
  resumed = recipe.run(c, parts)
  assert resumed['resumed_from_step'] == 3
  assert traced == [16, 32, 64], traced  # 16 before the stop; 32 and 64 after.
  got = _rows(parts)
  assert [r['step'] for r in got] == list(range(1, 9))
  for key in ('loss', 'batch_size', 'tokens_seen', 'learning_rate', 'grad_norm'):
    assert [r[key] for r in got] == [r[key] for r in rows], key
  assert resumed['tokens_seen'] == summary['tokens_seen']
  assert resumed['final_train_loss'] == summary['final_train_loss']


def test_batch_sweep_plan_is_valid(tmp_path):
  """experiments/pretrain/batch.py: valid entries that all see the same tokens."""
  from experiments.pretrain import batch
  from research.config import override
  for arg in (None, 'smoke=True'):
    tokens = set()
    for e in batch.sweep(arg):
      c = batch.get_config(arg)
      override(c, e)
      ramp = batch_ramp.validate(c, {'data': 1, 'fsdp': 1}, 1)
      tokens.add(ramp.tokens_through(c.steps, c.seq_len))
    if arg is None:  # Smoke sizes round the ramp's steps up.
      assert tokens == {200 * 32 * 128}, tokens
  r = run_cli(['launch.sweep', '--config=experiments/pretrain/batch.py:smoke=True',
               f'--workdir={tmp_path}', '--dry_run'])
  assert r.returncode == 0, r.stderr[-2000:]
  assert len(json.load(open(tmp_path / 'sweep.json'))['runs']) == 6
