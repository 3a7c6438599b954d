"""Quantization (research/quant): fake-quant numerics, STE, integer export, QAT, PTQ."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ConfigError, base_config
from research.feature_validation import validate_quant as validate_quant_config
from research.quant import model_bytes as bytes_lib
from research.quant import numerics, ptq, qat, rules
from research.models.transformer import Transformer
from tests.helpers import smoke_config

QMAX = {8: 127.5, 4: 7.5, 2: 1.5}  # qwix's symmetric bound: qmax + 1/2.


def _q(**kw):
  q = base_config().quant
  for k, v in kw.items():
    q[k] = v
  return q


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize('bits', [8, 4, 2])
def test_symmetric_error_bound_per_channel_tensor_group(bits):
  x = jax.random.normal(jax.random.key(0), (64, 48)) * jnp.linspace(0.1, 3, 48)
  # Per-channel (contraction axis 0 shared, one scale per column).
  scale = jnp.abs(x).max(axis=0, keepdims=True) / QMAX[bits]
  err = jnp.abs(numerics.fake_quant(x, bits, axis=0) - x)
  assert bool(jnp.all(err <= scale / 2 * (1 + 1e-4)))
  levels = numerics.fake_quant(x, bits, axis=0) / scale  # On the integer grid.
  np.testing.assert_allclose(levels, jnp.round(levels), atol=1e-3)
  assert float(jnp.abs(jnp.round(levels)).max()) <= 2 ** (bits - 1)
  # Per-tensor: one scale.
  t_scale = jnp.abs(x).max() / QMAX[bits]
  assert bool(jnp.all(jnp.abs(numerics.fake_quant(x, bits) - x) <= t_scale / 2 * (1 + 1e-4)))
  # Per-group of 16 along the contraction axis: each group's own scale.
  g_scale = jnp.abs(x.reshape(4, 16, 48)).max(axis=1, keepdims=True) / QMAX[bits]
  g_err = jnp.abs(numerics.fake_quant(x, bits, axis=0, group_size=16) - x).reshape(4, 16, 48)
  assert bool(jnp.all(g_err <= g_scale / 2 * (1 + 1e-4)))
  # Finer scales never hurt on average: group <= channel <= tensor.
  e = [float(jnp.mean(jnp.square(numerics.fake_quant(x, bits, **kw) - x)))
       for kw in (dict(axis=0, group_size=16), dict(axis=0), {})]
  assert e[0] <= e[1] <= e[2]


def test_asymmetric_error_bound_and_error_shrinks_with_bits():
  x = jax.random.uniform(jax.random.key(1), (128, 8), minval=-0.2, maxval=1.0)
  for bits in (8, 4):
    lo, hi = jnp.minimum(x.min(0), 0), jnp.maximum(x.max(0), 0)
    scale = (hi - lo) / (2 ** bits - 1)
    err = jnp.abs(numerics.fake_quant(x, bits, axis=0, symmetric=False) - x)
    assert bool(jnp.all(err <= scale * (1 + 1e-4)))  # Rounding + zero-point rounding.
  errs = [float(jnp.abs(numerics.fake_quant(x, b, axis=0) - x).max()) for b in (8, 4, 2)]
  assert errs[0] < errs[1] < errs[2]
  # Asymmetric uses the skewed range better than symmetric at 4 bits.
  asym = float(jnp.mean(jnp.square(numerics.fake_quant(x, 4, axis=0, symmetric=False) - x)))
  sym = float(jnp.mean(jnp.square(numerics.fake_quant(x, 4, axis=0) - x)))
  assert asym < sym


@pytest.mark.parametrize('clip', [1.0, 0.6])
def test_ste_gradient_is_identity_inside_clipping_range(clip):
  x = jax.random.normal(jax.random.key(2), (16, 32))
  w = jax.random.normal(jax.random.key(3), (32, 24))
  g = jax.random.normal(jax.random.key(4), (16, 24))
  q = _q(mode='qat', weight_bits=4, clip_ratio=clip)
  loss = lambda x, w: jnp.sum(numerics.quantized_dot(x, w, q) * g)
  dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
  # The forward is the fake-quantized matmul...
  wq = numerics.fake_quant(w, 4, axis=0, clip_ratio=clip)
  np.testing.assert_allclose(numerics.quantized_dot(x, w, q), x @ wq, rtol=1e-5, atol=1e-5)
  # ...and the weight gradient is the float one (d fake_quant / dw = 1) inside the clip
  # range, 0 outside it.
  inside = jnp.abs(w) <= clip * jnp.abs(w).max(axis=0, keepdims=True)
  np.testing.assert_allclose(dw, jnp.where(inside, x.T @ g, 0.0), rtol=1e-5, atol=1e-5)
  if clip == 1.0:
    assert bool(jnp.all(inside))
  else:
    assert 0 < int((~inside).sum()) < inside.size
  np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)  # Activations: float.


# --------------------------------------------------------------------------- models

SETTINGS = [  # (quant overrides, exact): integer export == fake-quant logits.
    (dict(weight_bits=8, act_bits=8), True),
    (dict(weight_bits=8, act_bits=8, granularity='tensor'), True),
    (dict(weight_bits=4, symmetric=False), True),
    (dict(weight_bits=2), True),
    (dict(weight_bits=4, act_bits=8, granularity='group', group_size=8), True),
    # Weight-only per-group dequantizes into the float matmul: the same math, summed in
    # another order (float32 rounding).
    (dict(weight_bits=4, granularity='group', group_size=8), False),
]


def _model(cfg):
  cfg.model.vocab_size = 259
  return Transformer(cfg.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('overrides,exact', SETTINGS)
def test_integer_export_and_fake_quant_give_identical_logits(overrides, exact):
  c = smoke_config(**{'quant.mode': 'qat', 'model.init_std': 0.2,
                      **{f'quant.{k}': v for k, v in overrides.items()}})
  model = _model(c)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 259, (2, 32)), jnp.int32)
  fake = qat.quantize_for_training(model, c)(tokens)
  int_model = ptq.quantize_to_integers(model, c)
  ints = int_model(tokens)
  if exact:
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(ints))
  else:
    np.testing.assert_allclose(fake, ints, rtol=0, atol=1e-5)
  assert float(jnp.abs(fake - model(tokens)).max()) > 1e-3  # Quantization did something.
  qvalues = {'/'.join(map(str, p)): v.get_value() for p, v in
             nnx.to_flat_state(nnx.state(int_model)) if p[-1] == 'qvalue'}
  assert len(qvalues) == 7  # q, k, v, out, wi_0, wi_1, wo; not the embedding/head.
  bits = overrides['weight_bits']
  for v in qvalues.values():
    assert v.dtype == (jnp.int8 if bits == 8 else jnp.int4)
    lo = -2 ** (bits - 1)
    assert lo <= int(v.astype(jnp.int32).min()) and int(v.astype(jnp.int32).max()) <= -lo - 1


def test_model_bytes_count_packed_integers_and_scales():
  c = smoke_config(**{'quant.mode': 'ptq', 'quant.init_from': 'x', 'quant.weight_bits': 4})
  model = _model(c)
  float_bytes = bytes_lib.model_bytes(nnx.state(model, nnx.Param))
  ints = bytes_lib.model_bytes(nnx.state(ptq.quantize_to_integers(model, c)), c.quant)
  d, f, layers = 32, 64, 2
  kernels = layers * (4 * d * d + 3 * d * f)
  assert ints['int_weights'] == kernels // 2  # 4 bits each.
  # Per-channel: one float32 scale per output feature of each kernel.
  assert ints['scales'] == 4 * layers * (3 * d + d + 2 * f + d)
  assert ints['float_params'] == float_bytes['total'] - 4 * kernels
  assert ints['total'] < float_bytes['total'] / 2


@pytest.mark.parametrize('act_bits,int_dots', [(8, 7), (0, 0)])
def test_int8_export_runs_integer_matmuls(act_bits, int_dots):
  """W8A8 integers: the 7 projections are s8 x s8 -> s32 dots in the compiled program
  (the CPU backend has them); weight-only int8 dequantizes into float dots."""
  import re
  c = smoke_config(**{'quant.mode': 'ptq', 'quant.init_from': 'x', 'quant.weight_bits': 8,
                      'quant.act_bits': act_bits})
  graphdef, state = nnx.split(ptq.quantize_to_integers(_model(c), c))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  hlo = forward.lower(state, jnp.zeros((2, 16), jnp.int32)).compile().as_text()
  assert len(re.findall(r'= s32\[[^\]]*\]\{[^}]*\} dot\(', hlo)) == int_dots
  assert re.search(r'= f32\[[^\]]*\]\{[^}]*\} dot\(', hlo)  # Attention, head: float.


def test_quant_config_errors_are_one_line():
  for kw, needle in [(dict(weight_bits=3), 'quant.weight_bits=3'),
                     (dict(act_bits=16), 'quant.act_bits=16'),
                     (dict(granularity='row'), "quant.granularity='row'"),
                     (dict(symmetric=False, weight_bits=2), 'asymmetric int2'),
                     (dict(mode='ptq'), 'quant.init_from'),
                     (dict(clip_ratio=1.5), 'quant.clip_ratio'),
                     (dict(targets='('), 'quant.targets'),
                     (dict(mode='int8'), 'quant.mode')]:
    with pytest.raises(ConfigError, match=needle) as e:
      validate_quant_config(_q(**kw))
    assert '\n' not in str(e.value)
  c = smoke_config(**{'quant.mode': 'qat', 'quant.granularity': 'group',
                      'quant.group_size': 24})
  with pytest.raises(ConfigError, match='quant.group_size=24 does not divide'):
    rules.check_model(c)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope='module')
def float_run(tmp_path_factory):
  from research.recipe import run as train
  d = tmp_path_factory.mktemp('quant') / 'float'
  train(smoke_config(**{'num_samples': 0, 'eval_steps': 2}), str(d))  # Backend defaults on.
  return d


def test_ptq_exports_integers_and_evaluates_from_them(float_run):
  d = float_run.parent / 'ptq'
  c = smoke_config(**{'quant.mode': 'ptq', 'quant.init_from': 'float', 'quant.weight_bits': 4,
                      'quant.act_bits': 8, 'num_samples': 0, 'eval_steps': 2})
  from research import recipe
  res = recipe.run(c, str(d))
  assert res['source'] == str(float_run)
  assert res['int_eval']['loss'] == res['fakequant_eval']['loss']  # Identical logits.
  assert res['int_eval']['loss'] != res['float_eval']['loss']
  assert res['int_dtypes'] == ['int4']
  assert res['model_bytes']['total'] < res['float_model_bytes'] / 2
  summary = json.loads((d / 'summary.json').read_text())  # Sweep-readable output.
  assert summary['final_eval_loss'] == res['eval_loss']
  assert math.isclose(res['perplexity'], math.exp(res['eval_loss']))
  assert os.path.isdir(d / 'export')
  float_summary = json.loads((float_run / 'summary.json').read_text())
  assert math.isclose(res['float_eval']['loss'], float_summary['final_eval_loss'], rel_tol=1e-5)


def test_qat_fine_tune_starts_from_float_weights(float_run):
  from research import recipe
  from research import sharding as shd
  from research.train_state import create_train_state
  c = smoke_config(**{'quant.mode': 'qat', 'quant.init_from': str(float_run)})
  c, task, _ = recipe.compose(c, build_tokenizer=False)
  assert task.features == ('qat', 'quant_init')
  mesh = shd.mesh_from_config(c.mesh)
  ts = create_train_state(c, mesh, task)
  state = task.initialize(ts, str(float_run.parent / 'qat'))
  float_model, _, _ = recipe.load_run_model(str(float_run), mesh=mesh)
  loaded, fresh = nnx.state(float_model, nnx.Param), nnx.state(ts.state[0], nnx.Param)
  for (p, a), (_, b), (_, f) in zip(nnx.to_flat_state(state[0]), nnx.to_flat_state(loaded),
                                    nnx.to_flat_state(fresh)):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
  assert int(state[1]['step'].get_value()) == 0  # Fresh optimizer.


def test_qat_trains_under_sharding_like_data_parallel(tmp_path):
  """QAT on a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices matches data-parallel."""
  from research.recipe import run as train
  assert jax.device_count() == 8
  common = {'quant.mode': 'qat', 'quant.act_bits': 8, 'num_samples': 0, 'eval_steps': 1}
  sharded = train(smoke_config(**common, **{'mesh.data': 2, 'mesh.fsdp': 2,
                                            'mesh.tensor': 2}), str(tmp_path / 'sharded'))
  plain = train(smoke_config(**common), str(tmp_path / 'dp'))
  assert math.isfinite(sharded['final_train_loss'])
  np.testing.assert_allclose(sharded['final_train_loss'], plain['final_train_loss'], rtol=2e-3)
  np.testing.assert_allclose(sharded['final_eval_loss'], plain['final_eval_loss'], rtol=2e-3)
  meta = json.loads((tmp_path / 'sharded' / 'config.json').read_text())
  assert meta['mesh_shape']['tensor'] == 2 and meta['mesh_shape']['fsdp'] == 2


def test_ablation_sweep_plan_and_table(tmp_path):
  from research import config_files, sweep as sweep_lib
  from research.quant import ablation
  plan = sweep_lib.make_plan('experiments/qat/ablation.py:smoke=True', str(tmp_path),
                             seeds=None, extra_args=[], python='python')
  names = [r.overrides['name'] for r in plan.runs]
  assert names[0] == 'float' and plan.runs[0].label == 'name=float'
  assert {'qat-ft-w8a8', 'qat-scratch-w4', 'ptq-w4', 'ptq-w2', 'float-ft'} <= set(names)
  module, arg = config_files.load_config_module(plan.config)
  configs = {r.name: ablation._config_for(module, arg, r) for r in plan.runs}
  for r in plan.runs:  # Every setting is valid.
    validate_quant_config(configs[r.name].quant)
    rules.check_model(configs[r.name])
  fake = {plan.runs[0].name: ('none', 2.0, None), plan.runs[names.index('ptq-w4')].name:
          ('ptq', 2.2, 2.0)}
  for r in plan.runs:
    if r.name in fake:
      mode, loss, src = fake[r.name]
      os.makedirs(r.workdir)
      with open(os.path.join(r.workdir, ptq.SUMMARY), 'w') as f:
        json.dump({'setting': rules.describe(configs[r.name].quant), 'eval_loss': loss,
                   'float_eval': {'loss': src or loss}, 'model_bytes': {'total': 100},
                   'float_model_bytes': 400}, f)
  text = ablation.write_table(str(tmp_path), plan, configs)
  assert '| ptq-w4 | PTQ | W4A16 per-channel sym | 0 | 2.2000 | +0.2000 (+10.00%) |' in text
  assert '4.00x smaller' in text
