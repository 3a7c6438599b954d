"""Compression: distillation loss, pruning masks/schedules, structured export, ablation."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.compress import distill, prune
from research.compress import export as export_lib
from research.config import ConfigError
from tests.helpers import smoke_config


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_distill_loss_matches_numpy_kl():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 3, 5)).astype(np.float32)
  t = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
  w = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  hard, alpha, T = 1.7, 0.7, 3.0
  pt, ps = _softmax(t / T), _softmax(s / T)
  kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)
  kl_mean = (kl * w).sum() / w.sum()
  want = (1 - alpha) * hard + alpha * T ** 2 * kl_mean
  loss, got_kl = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.float32(hard),
                                      jnp.asarray(w), alpha=alpha, temperature=T)
  np.testing.assert_allclose(float(got_kl), kl_mean, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # No gradient reaches the teacher's logits; alpha=0 is the hard loss alone.
  g = jax.grad(lambda tt: distill.distill_loss(jnp.asarray(s), tt, 0.0, jnp.asarray(w),
                                               alpha=0.5, temperature=T)[0])(jnp.asarray(t))
  assert not np.any(np.asarray(g))
  l0, _ = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.float32(hard),
                               jnp.asarray(w), alpha=0.0, temperature=T)
  np.testing.assert_allclose(float(l0), hard, rtol=1e-6)


def test_cubic_schedule_and_nm_masks():
  p = smoke_config(**{'prune.method': 'magnitude', 'prune.sparsity': 0.9,
                      'prune.initial_sparsity': 0.1, 'prune.begin_step': 10,
                      'prune.end_step': 50, 'prune.frequency': 10}).prune
  for t in (0, 9, 10, 20, 30, 45, 50, 80):
    want = 0.0 if t < 10 else 0.9 + (0.1 - 0.9) * (1 - min(t - 10, 40) / 40) ** 3
    assert float(prune.sparsity_at(jnp.int32(t), p)) == pytest.approx(want, abs=1e-6)
    assert float(prune.sparsity_at(t, p, xp=np)) == pytest.approx(want, abs=1e-12)
  assert [t for t in range(60) if bool(prune.is_update_step(t, p, xp=np))] == [10, 20, 30, 40, 50]
  w = jax.random.normal(jax.random.key(0), (2, 16, 6))  # [layers, in, out]
  m = np.asarray(prune.nm_mask(w, (1,), 2, 4))
  assert m.shape == w.shape
  np.testing.assert_array_equal(m.reshape(2, 4, 4, 6).sum(axis=2), 2)  # Along 'in'.
  kept = np.abs(np.asarray(w)).reshape(2, 4, 4, 6)
  # The kept two are the largest two of each group.
  mk = m.reshape(2, 4, 4, 6)
  assert (np.where(mk, kept, np.inf).min(2) >= np.where(mk, -np.inf, kept).max(2)).all()
  # Einsum 'out' kernel [L, N, H, D]: the input axes are (N, H), groups along H.
  w2 = jax.random.normal(jax.random.key(1), (2, 4, 8, 5))
  m2 = np.asarray(prune.nm_mask(w2, (1, 2), 2, 4))
  np.testing.assert_array_equal(m2.reshape(2, 4, 2, 4, 5).sum(axis=3), 2)
  mm = np.asarray(prune.magnitude_mask(w, 0.75))
  np.testing.assert_array_equal((~mm).reshape(2, -1).sum(-1), 72)  # floor(.75 * 96).


def test_config_validation_names_keys():
  from research.feature_validation import validate_features as validate_compress_config
  for key, value, word in (('prune.method', 'random', 'prune.method'),
                           ('prune.sparsity', 1.5, 'prune.sparsity'),
                           ('prune.end_step', 0, None), ('distill.alpha', 2.0, 'distill.alpha'),
                           ('distill.temperature', 0.0, 'distill.temperature')):
    c = smoke_config(**{'prune.method': 'magnitude', key: value})
    if word is None:
      validate_compress_config(c)
      continue
    with pytest.raises(ConfigError, match=word.replace('.', r'\.')):
      validate_compress_config(c)
  with pytest.raises(ConfigError, match=r'prune\.n'):
    validate_compress_config(smoke_config(**{'prune.method': 'nm', 'prune.n': 4}))


@pytest.mark.parametrize('scan', [True, False])
def test_structured_export_same_logits(scan):
  from research.recipe import compose_task
  c = smoke_config(**{'prune.method': 'structured', 'prune.sparsity': 0.5,
                      'model.scan_layers': scan, 'model.vocab_size': 259})
  model = compose_task(c).build_model()
  masks = prune.compute_masks(model, c.prune, 0.5)
  for path, mod in prune.masked_modules(model):
    mod.prune_mask[...] = masks[path].astype(mod.prune_mask[...].dtype)
  prune.apply_masks(model)
  counts = prune.structure_counts(model)
  assert counts['kv_heads_kept_per_layer'] == [2, 2]
  assert counts['mlp_neurons_kept_per_layer'] == [32, 32]
  small, cfg, _ = export_lib.shrink(model, c)
  assert (cfg.model.num_heads, cfg.model.mlp_dim, cfg.model.head_dim) == (2, 32, 8)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)), jnp.int32)
  np.testing.assert_allclose(np.asarray(small(tokens)), np.asarray(model(tokens)), atol=1e-5)
  assert export_lib.param_bytes(small)['params'] < export_lib.param_bytes(model)['params']


# --------------------------------------------------------------------------- runs


DISTILLED = 'student-distill-a0.9'
# The distilled student's run is the sharded distillation run (test_distillation_sharded_run):
# trained once, by the ablation, under a data x FSDP x tensor mesh instead of plain DP.
SHARDED_STUDENT = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


@pytest.fixture(scope='module')
def ablation_dir(tmp_path_factory):
  """The smoke ablation (in this process, 8 fake devices): every run once, reused."""
  from research.compress import ablation
  from research.config import override
  d = str(tmp_path_factory.mktemp('compress'))
  real_plan = ablation.plan

  def plan(*args, **kwargs):
    runs = real_plan(*args, **kwargs)
    [student] = [c for name, _, c in runs if name == DISTILLED]
    override(student, SHARDED_STUDENT)
    return runs

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ablation, 'plan', plan)
    rc = ablation.run(d, smoke=True)
  assert rc == 0, open(os.path.join(d, ablation.TABLE)).read()
  return d


def test_ablation_smoke_writes_table(ablation_dir):
  text = open(os.path.join(ablation_dir, 'compress_results.md')).read()
  for name in ('baseline', 'student-scratch', 'student-distill-a0.9', 'prune-magnitude-0.75',
               'prune-2:4', 'prune-structured', 'ptq-int8', 'ptq-int4'):
    assert f'| {name} |' in text
  rows = json.load(open(os.path.join(ablation_dir, 'compress_results.json')))
  assert all(r['status'] == 'ok' and r['loss'] is not None for r in rows), rows
  ex = json.load(open(os.path.join(ablation_dir, 'prune-structured', 'export', 'eval.json')))
  assert ex['max_abs_logit_diff'] < 1e-5 and ex['params'] < ex['dense_params']
  st = json.load(open(os.path.join(ablation_dir, 'prune-structured', 'summary.json')))
  assert ex['eval']['loss'] == pytest.approx(st['final_eval_loss'], abs=1e-4)


def test_masks_keep_pruned_weights_exactly_zero(ablation_dir):
  """prune-magnitude-0.75: AdamW (weight decay 0.1), masks updated steps 1-4 to 0.75, then
  two more updates: pruned weights are exactly zero, in the checkpoint, per layer."""
  d = os.path.join(ablation_dir, 'prune-magnitude-0.75')
  cfg = json.load(open(os.path.join(d, 'config.json')))['config']
  assert cfg['optimizer']['weight_decay'] > 0 and cfg['optimizer']['name'] == 'adamw'
  assert cfg['steps'] > cfg['prune']['end_step']
  model, config, step = export_lib.load_pruned_model(d)
  assert step == config.steps
  mods = prune.masked_modules(model)
  assert len(mods) == 7  # q, k, v, out, wi_0, wi_1, wo (stacked layers).
  for path, mod in mods:
    k = np.asarray(mod.kernel[...])
    m = np.asarray(mod.prune_mask[...])
    assert np.all(k[m == 0] == 0), path
    assert np.all(k[m != 0] != 0), path
    per_layer = (m == 0).reshape(m.shape[0], -1).mean(-1)
    np.testing.assert_allclose(per_layer, 0.75, atol=1 / m[0].size)
  rep = json.load(open(os.path.join(d, 'sparsity.json')))
  assert rep['sparsity'] == pytest.approx(0.75, abs=1e-3)
  assert all(v['sparsity'] == v['mask_sparsity'] for v in rep['layers'].values())
  assert len(rep['layers']) == 14  # 7 kernels x 2 layers.
  assert rep['effective_bytes'] < rep['dense_bytes']
  nm = json.load(open(os.path.join(ablation_dir, 'prune-2:4', 'sparsity.json')))
  assert nm['sparsity'] == pytest.approx(0.5)


def test_distillation_sharded_run(ablation_dir):
  """The ablation's distilled student (alpha 0.9, T=2), trained under the (2,2,2) mesh."""
  from research import recipe
  from research import sharding as shd
  from research.train_state import abstract_train_state
  teacher = os.path.join(ablation_dir, 'baseline')
  work = os.path.join(ablation_dir, DISTILLED)
  run_cfg = json.load(open(os.path.join(work, 'config.json')))['config']
  assert (run_cfg['mesh']['data'], run_cfg['mesh']['fsdp'], run_cfg['mesh']['tensor']) == (2, 2, 2)
  assert run_cfg['distill']['teacher'] == teacher
  assert (run_cfg['distill']['alpha'], run_cfg['distill']['temperature']) == (0.9, 2.0)
  summary = json.load(open(os.path.join(work, 'summary.json')))
  rows = [json.loads(l) for l in open(os.path.join(work, 'metrics.jsonl'))]
  train_rows = [r for r in rows if r['split'] == 'train']
  assert train_rows[-1]['distill_kl'] < train_rows[0]['distill_kl']
  assert train_rows[-1]['distill_loss'] < train_rows[0]['distill_loss']
  scratch = [json.loads(l) for l in open(os.path.join(ablation_dir, 'student-scratch',
                                                      'metrics.jsonl'))]
  scratch_loss = [r['loss'] for r in scratch if r['split'] == 'train']
  assert abs(train_rows[-1]['loss'] - scratch_loss[-1]) > 1e-4
  assert summary['param_count'] < 20_000  # The student only; the teacher is not counted.
  assert json.load(open(os.path.join(work, 'teacher.json')))['teacher_params'] > 30_000
  # The teacher: sharded with the student's logical axes, outside the optimizer.
  over = {'distill.teacher': teacher, 'distill.alpha': 0.9, 'distill.temperature': 2.0,
          'model.d_model': 16, 'model.mlp_dim': 32, 'num_samples': 0, **SHARDED_STUDENT}
  c = smoke_config(**over)
  c.model.vocab_size = 259
  c, task, _ = recipe.compose(c, work, build_tokenizer=False)
  mesh = shd.mesh_from_config(c.mesh)
  ts = abstract_train_state(c, mesh, task)
  flat = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(ts.shardings)}
  t_q = flat['0/teacher/blocks/attn/query/kernel']
  s_q = flat['0/blocks/attn/query/kernel']
  assert t_q.get_value().spec == s_q.get_value().spec
  assert 'tensor' in str(t_q.get_value().spec)
  assert not any('teacher' in p for p in flat if p.startswith('1/'))
