"""Mixture of experts (research/models/moe.py): the layer against a naive per-token
reference, dropless vs a capacity that drops nothing, expert parallelism (with data,
FSDP and tensor parallelism) against one device over 10 training steps, one-line config
errors, a training run whose loss goes down, QAT of the experts and LoRA from an MoE run.

8 fake CPU devices come from tests/conftest.py.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import sharding as shd
from research.config import ConfigError, override
from research.models import moe as moe_lib
from research.models.transformer import Transformer, count_params

E, K, D, F = 4, 2, 32, 48
MOE_SMOKE = 'experiments/pretrain/moe.py:smoke=True'


def _layer(kind='swiglu', capacity_factor=0.0) -> moe_lib.MoE:
  with nnx.use_eager_sharding(False):
    # init_std 0.3: routing far from uniform, outputs O(1) (float32 rounding ~1e-7).
    return moe_lib.MoE(D, E, K, F, kind=kind, capacity_factor=capacity_factor,
                       norm_topk=True, init_std=0.3, out_init_std=0.3, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _x(b=4, l=8, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def _params(layer: moe_lib.MoE) -> dict[str, jax.Array]:
  out = dict(layer.expert_weights())
  out['router'] = layer.router.kernel[...]
  return out


def _layer_fn(layer: moe_lib.MoE):
  """(x, params) -> sum(y * probe): the layer as a function of its inputs and weights."""
  graphdef, state = nnx.split(layer)
  probe = jax.random.normal(jax.random.key(7), (4, 8, D))

  def f(x, params):
    m = nnx.merge(graphdef, state, copy=True)
    m.router.kernel[...] = params['router']
    for name in ('wi_0', 'wi_1', 'wi', 'wo'):
      if name in params:
        getattr(m, name)[...] = params[name]
    y, _ = m(x)
    return jnp.sum(y * probe)
  return f


def _reference_fn(kind):
  probe = jax.random.normal(jax.random.key(7), (4, 8, D))

  def f(x, params):
    w = {k: v for k, v in params.items() if k != 'router'}
    y = moe_lib.reference_moe(x.reshape(-1, D), params['router'], w, top_k=K, kind=kind)
    return jnp.sum(y.reshape(x.shape) * probe)
  return f


@pytest.mark.parametrize('kind', ['swiglu', 'gelu'])
def test_layer_matches_the_naive_per_token_reference(kind):
  """Forward and every gradient (input, router, experts) to float32 rounding."""
  layer = _layer(kind)
  x, params = _x(), _params(layer)
  y, aux = layer(x)
  w = {k: v for k, v in params.items() if k != 'router'}
  want = moe_lib.reference_moe(x.reshape(-1, D), params['router'], w, top_k=K, kind=kind)
  # |y| ~ 1: 2e-6 is ~20 float32 ulps (sums in another order), far below any real bug.
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), np.asarray(want), atol=2e-6)
  got_g = jax.jit(jax.grad(_layer_fn(layer), argnums=(0, 1)))(x, params)
  want_g = jax.jit(jax.grad(_reference_fn(kind), argnums=(0, 1)))(x, params)
  for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=1e-5)
  assert float(aux['moe_drop_fraction']) == 0.0
  assert 0.9 < float(aux['moe_lb_loss']) < float(E)  # 1.0 = perfectly balanced.


def test_capacity_that_drops_nothing_equals_dropless_also_with_expert_parallelism():
  """cf = E/K: every expert can take all of a device's tokens. On one device and under
  expert=4 x tensor=2 (the all-to-all of the [E, C, D] buffers); a small cf drops."""
  x, f_dropless = _x(8), _layer_fn(_layer())
  probe_x = x[:4]
  params = _params(_layer())
  want = jax.jit(jax.value_and_grad(f_dropless, argnums=(0, 1)))(probe_x, params)
  full = _layer_fn(_layer(capacity_factor=E / K))
  got = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(probe_x, params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6)
  mesh = shd.make_mesh(1, 1, 2, expert=4)
  with shd.use_mesh(mesh):
    sharded = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(probe_x, params)
  for g, r in zip(jax.tree.leaves(sharded), jax.tree.leaves(want)):  # Router grads ~100.
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
  _, aux = _layer(capacity_factor=0.5)(x)
  assert float(aux['moe_drop_fraction']) >= 0.5  # C = 0.5 * T*K/E: half the slots.


def test_model_scan_or_loop_and_active_params():
  """Aux losses come out of the scanned and the unrolled layer stack alike; shared
  experts add a dense MLP; active parameters count top_k / E of the routed experts."""
  from research.config import base_config
  c = base_config().model
  override_model = dict(vocab_size=64, d_model=D, num_heads=4, mlp_dim=64, num_layers=2,
                        moe_num_experts=E, moe_top_k=K, moe_mlp_dim=F, moe_shared_experts=1,
                        mlp_kind='gelu')
  for k, v in override_model.items():
    c[k] = v
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  outs = []
  for scan in (True, False):
    c.scan_layers = scan
    model = Transformer(c, rngs=nnx.Rngs(0))
    logits, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(model, tokens)
    outs.append((np.asarray(logits), {k: float(v) for k, v in aux.items()}))
  np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
  assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5) and set(outs[0][1]) == set(
      moe_lib.AUX_KEYS)
  assert model.blocks[0].mlp.wi.kernel.shape == (D, F)  # One shared expert.
  counts = count_params(model)
  experts = 2 * 2 * E * D * F  # layers x (wi, wo) x E x D x F
  assert counts['total'] - counts['active'] == experts - experts * K // E
  assert counts['non_embedding'] - counts['active_non_embedding'] == experts // 2


# --------------------------------------------------------------------------- training


def _moe_config(**overrides):
  from experiments.pretrain import moe
  c = moe.get_config('smoke=True')
  c.model.vocab_size = 259
  override(c, {'batch_size': 8, 'seq_len': 16, 'num_samples': 0,
               'optimizer.learning_rate': 3e-3, 'optimizer.warmup_steps': 3,
               'model.num_heads': 4, **overrides})
  return c


def _step_losses(config, devices, batches) -> list[dict[str, float]]:
  """The trainer's own jitted step (research/step.py) on ``batches`` over ``devices``."""
  from research import step as step_lib
  from research.tasks import make_task
  from research.train_state import create_train_state
  mesh = shd.mesh_from_config(config.mesh, devices=devices)
  task = make_task(config)
  ts = create_train_state(config, mesh, task)
  sharding = step_lib.batch_sharding(mesh, config)
  step = step_lib.make_train_step(config, task, ts, sharding)
  state, out = ts.state, []
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    for batch in batches:
      state, m = step(state, jax.device_put(batch, sharding))
      out.append({k: float(m[k]) for k in ('total_loss', 'loss', 'moe_lb_loss')})
  return out


# float32 tolerance on the per-step total loss (CE + weighted aux losses, 5.57 -> 5.24
# over the 10 steps), the CE and the load-balancing loss: sharded matmuls, all-reduces
# and all-to-alls sum in other orders. Measured max |diff| over the 10 steps: 9.5e-7
# under fsdp2_tensor2_expert2 (and, measured once, 4.8e-7 under data=2 x fsdp=2 x
# expert=2 and 9.5e-7 under tensor=2 x expert=4): 1-2 float32 ulps at 5.5. 1e-5 is 10x
# that; a routing or reduction bug (a pair sent to the wrong expert, a gradient not
# summed over a shard) changes the update itself, not its last bits. One mesh here to
# keep the suite's time: the batch split over fsdp (= data for activations) and expert,
# FSDP-gathered experts, tensor-split expert widths.
EP_ATOL = 1e-5
EP_MESHES = {  # data, fsdp, tensor, expert (expert=4 x tensor=2: the capacity test)
    'fsdp2_tensor2_expert2': (1, 2, 2, 2),
}


def test_expert_parallel_training_equals_one_device():
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(10):
    t = rng.randint(0, 64, size=(8, 17)).astype(np.int32)
    batches.append({'inputs': t[:, :-1], 'targets': t[:, 1:],
                    'mask': np.ones((8, 16), np.float32)})
  one = _step_losses(_moe_config(**{'mesh.data': 1}), jax.devices()[:1], batches)
  assert one[-1]['loss'] < one[0]['loss']
  for name, (d, f, t, e) in EP_MESHES.items():
    c = _moe_config(**{'mesh.data': d, 'mesh.fsdp': f, 'mesh.tensor': t, 'mesh.expert': e})
    got = _step_losses(c, jax.devices(), batches)
    diff = max(abs(g[k] - o[k]) for g, o in zip(got, one) for k in o)
    assert diff <= EP_ATOL, (name, diff)


@pytest.mark.parametrize('overrides, needle', [
    ({'model.moe_num_experts': 6, 'mesh.expert': 4}, 'mesh.expert=4 does not divide '
                                                     'model.moe_num_experts=6'),
    ({'model.moe_top_k': 5}, 'model.moe_top_k=5'),
    ({'model.moe_num_experts': 0, 'mesh.expert': 2}, 'mesh.expert=2 needs'),
    ({'model.moe_capacity_factor': -1.0}, 'model.moe_capacity_factor=-1.0'),
])
def test_bad_moe_config_fails_in_one_line(overrides, needle):
  from research.validation import validate_config
  c = _moe_config(**overrides)
  with pytest.raises(ConfigError) as e:
    validate_config(c)
  assert '\n' not in str(e.value) and needle in str(e.value), str(e.value)


@pytest.fixture(scope='module')
def moe_run(tmp_path_factory):
  """The smoke MoE config trained by the trainer under data=4 x expert=2 (12 steps)."""
  from research.recipe import run as train
  wd = str(tmp_path_factory.mktemp('moe') / 'pretrain')
  train(_moe_config(**{'mesh.data': 4, 'mesh.expert': 2, 'steps': 12, 'seq_len': 32,
                       'log_every': 4, 'eval_every': 12, 'checkpoint_every': 12}), wd)
  return wd


def test_moe_run_loss_goes_down_and_logs_aux_losses(moe_run):
  rows = [json.loads(l) for l in open(os.path.join(moe_run, 'metrics.jsonl'))]
  train = [r for r in rows if r['split'] == 'train']
  assert train[-1]['loss'] < train[0]['loss'] - 0.3, (train[0]['loss'], train[-1]['loss'])
  for r in train + [r for r in rows if r['split'] == 'eval']:
    assert {'moe_lb_loss', 'moe_z_loss', 'moe_drop_fraction'} <= set(r)
    assert r['moe_drop_fraction'] == 0.0 and 0.9 < r['moe_lb_loss'] < 4.0


def test_lora_fine_tunes_an_moe_run(moe_run, tmp_path):
  """LoRA adapters on the attention projections (the default targets; routed experts and
  the router stay frozen): only adapters move, the loss is finite."""
  from research import recipe, runs
  from research.finetune import init as ft_init
  wd = str(tmp_path / 'lora')
  c = _moe_config(**{'finetune.init_from': moe_run, 'finetune.mode': 'lora',
                     'finetune.lora_rank': 2, 'steps': 3, 'eval_every': 3,
                     'checkpoint_every': 3, 'mesh.data': 4, 'mesh.expert': 2})
  summary = recipe.run(c, wd)
  assert np.isfinite(summary['final_eval_loss'])
  report = json.load(open(os.path.join(wd, ft_init.REPORT)))
  assert report['trainable_params'] == report['lora_params'] > 0
  tuned, _, _ = recipe.load_run_model(wd)
  flat = {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in
          nnx.to_flat_state(nnx.state(tuned))}
  assert any(k.endswith('lora_b') and np.abs(v).max() > 0 for k, v in flat.items())
  src, _ = runs.restore_params(moe_run, -1, nnx.state(tuned, nnx.Param))
  for path in ('blocks/moe/wi_0', 'blocks/moe/wo', 'blocks/moe/router/kernel',
               'blocks/attn/query/kernel'):
    np.testing.assert_array_equal(flat[path], np.asarray(src[path]), err_msg=path)


def test_qat_fake_quantizes_the_experts():
  """quant.mode='qat' with only the experts as targets: the model equals the float model
  whose expert kernels are replaced by their int4 fake-quantized values (per expert and
  output channel, qwix's arithmetic); gradients pass straight through."""
  from research.quant.numerics import fake_quant
  from research.quant.qat import quantize_for_training
  c = _moe_config(**{'quant.mode': 'qat', 'quant.weight_bits': 4,
                     'quant.targets': r'(.*/)?moe/(wi_0|wi_1|wo)'})
  tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, 259)
  qat = quantize_for_training(Transformer(c.model, rngs=nnx.Rngs(0)), c)
  assert qat.blocks.moe.quantizer.names == ('wi_0', 'wi_1', 'wo')
  ref = Transformer(c.model, rngs=nnx.Rngs(0))
  float_out = np.asarray(ref(tokens))
  for name in ('wi_0', 'wi_1', 'wo'):
    w = getattr(ref.blocks.moe, name)
    w[...] = jax.vmap(lambda a: fake_quant(a, 4, axis=1))(w[...])  # Per layer.
  want = np.asarray(ref(tokens))
  np.testing.assert_allclose(np.asarray(qat(tokens)), want, atol=1e-5)
  assert np.abs(want - float_out).max() > 1e-3  # int4 moved the logits.

  def grads(model):
    return nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model).blocks.moe.wo[...]
  np.testing.assert_allclose(np.asarray(grads(qat)), np.asarray(grads(ref)), atol=1e-6)


def test_decoding_an_expert_parallel_model():
  """A batch the token shards do not divide (3 rows, data=4 x expert=2): the layer falls
  back to routing the whole batch on every device; same logits and greedy tokens."""
  from research.decode import generate
  c = _moe_config(**{'mesh.data': 4, 'mesh.expert': 2})
  prompts = np.random.RandomState(0).randint(3, 259, size=(3, 5)).astype(np.int32)
  single = Transformer(c.model, rngs=nnx.Rngs(0))
  want_logits, want = np.asarray(single(prompts)), generate(single, prompts, max_new_tokens=3)
  with shd.use_mesh(shd.mesh_from_config(c.mesh)):
    model = Transformer(c.model, rngs=nnx.Rngs(0))
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, prompts))
    out = generate(model, prompts, max_new_tokens=3)
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  np.testing.assert_array_equal(out, want)
