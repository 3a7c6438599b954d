"""Pipeline parallelism (mesh.stage, research/models/pipeline.py) on 8 fake CPU devices.

The trainer's own jitted step (research/step.py, the one train/plan/benchmark use) runs
10 updates on the same fixed batches with no pipeline (DP over 8 devices) and under a
4-stage GPipe (with data parallelism) and a 2-stage circular schedule composed with FSDP
and tensor parallelism; every step's loss must agree. A mixture-of-experts model under
2 stages x expert parallelism must equal gradient accumulation over the same
micro-batches (its load-balancing loss is per micro-batch). The toy schedule tests check
values and gradients against a plain scan (GPipe with fewer micro-batches than stages,
circular with as many). Wrong pipeline configs fail in ``recipe.run`` before compiling,
in one line. Kept short: one test trains all layouts (not a module fixture, which two
xdist workers could both compute), a 4-layer model, one init compile per model (the
other layouts reshard that initial state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from research import sharding as shd
from research.config import override
from research.models import pipeline as pl
from tests.helpers import assert_one_line_config_error_before_compiling, smoke_config

STEPS = 10
# float32 tolerance on the per-step loss (~5.5 -> ~4.86 nats over the 10 steps). A
# pipeline runs the same per-example arithmetic in micro-batches (and FSDP/TP sum in
# other orders), so losses differ in the last bits only. Measured max |diff| over the
# 10 steps, on both pipelined layouts and the MoE pair: 4.8e-7 to 1.4e-6 (1-3 float32
# ulps at loss ~5; the batches are this file's bytes, so the exact figures move when it
# is edited); 2e-5 is 14x the largest. A schedule bug (a stage skipped, a micro-batch on the
# wrong layers, a stale circular buffer, an aux loss from a bubble iteration) changes
# the forward pass itself, not its last bits.
ATOL = 2e-5
MODEL = {'model.num_layers': 4, 'model.d_model': 32, 'model.num_heads': 4,
         'model.mlp_dim': 64, 'model.vocab_size': 259}
RUN = {'batch_size': 16, 'seq_len': 16, 'steps': STEPS, 'log_every': 1, 'eval_steps': 0,
       'checkpoint_every': 1000, 'num_samples': 0, 'optimizer.learning_rate': 3e-3,
       'optimizer.warmup_steps': 3}
LAYOUTS = {  # name: config overrides (stage=1 'dp' is the reference).
    'dp': {'mesh.data': 8},
    # 4 stages x data 2, GPipe, M = 8 > S (one sequence per micro-batch and data shard).
    'gpipe_s4_m8': {'mesh.data': 2, 'mesh.stage': 4, 'model.pipeline_microbatches': 8},
    # 2 stages x FSDP 2 x TP 2, circular (2 repeats), M = 4 > S: the circular buffer.
    'circular_s2_fsdp2_tp2': {'mesh.data': 1, 'mesh.stage': 2, 'mesh.fsdp': 2,
                              'mesh.tensor': 2, 'model.pipeline_schedule': 'circular',
                              'model.pipeline_repeats': 2, 'model.pipeline_microbatches': 4},
}
# Mixture of experts (experiments/pretrain/moe.py smoke: 2 layers, 4 experts top-2,
# dropless): the pipeline's aux losses are means over micro-batches of each
# micro-batch's routing statistics, exactly what gradient accumulation over the same
# micro-batches (rows i, i+M, ...) computes; the reference is that, without stages.
MOE_LAYOUTS = {
    'moe_dp_accum2': {'mesh.data': 8, 'optimizer.grad_accum_steps': 2},
    'moe_s2_expert2': {'mesh.data': 2, 'mesh.stage': 2, 'mesh.expert': 2,
                       'model.pipeline_microbatches': 2},
}
MOE_METRICS = ('total_loss', 'loss', 'moe_lb_loss', 'moe_z_loss')


def _config(**overrides):
  return smoke_config(**{**MODEL, **RUN, **overrides})


def _moe_config(**overrides):
  from experiments.pretrain import moe
  c = moe.get_config('smoke=True')
  override(c, {'model.vocab_size': 259, 'model.num_heads': 4, **RUN, **overrides})
  return c


def _batches(n: int, batch: int, seq: int) -> list[dict[str, np.ndarray]]:
  """Fixed byte-level batches of real text (this test file), the same for every layout."""
  with open(__file__, 'rb') as f:
    data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    starts = rng.integers(0, len(data) - seq - 1, batch)
    rows = np.stack([data[s:s + seq + 1] for s in starts])
    out.append({'inputs': rows[:, :-1], 'targets': rows[:, 1:],
                'mask': np.ones((batch, seq), np.float32)})
  return out


def train_all(configs: dict, metrics=('loss',)) -> dict[str, tuple[list, dict]]:
  """{name: (per-step ``metrics`` of ``STEPS`` updates of the trainer's step, the
  trained state's shards and the compiled step's HLO text)} for each config.

  The first config's state is initialised (the trainer's sharded init); the others get
  that same state resharded onto their meshes, which skips one init compile per layout
  and starts every layout from identical parameters.
  """
  from research.step import batch_sharding, make_train_step
  from research.tasks import make_task
  from research.train_state import abstract_train_state, create_train_state
  from research.validation import check_batch_divisibility, validate_config
  setups, init = {}, None
  for name, config in configs.items():
    validate_config(config)
    mesh = shd.mesh_from_config(config.mesh)
    check_batch_divisibility(config, dict(mesh.shape), 1)
    task = make_task(config)
    if init is None:
      ts = create_train_state(config, mesh, task)
      init = ts.state
    else:  # Resharded before any step runs (the step donates its input state).
      ts = abstract_train_state(config, mesh, task)
      ts = dataclasses.replace(ts, state=jax.device_put(init, ts.shardings, may_alias=False))
    setups[name] = (config, mesh, task, ts)
  runs = {}
  for name, (config, mesh, task, ts) in setups.items():
    sharding = batch_sharding(mesh, config)
    step = make_train_step(config, task, ts, sharding)
    state, out = ts.state, []
    with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
      for batch in _batches(STEPS, config.batch_size, config.seq_len):
        batch = jax.device_put(batch, sharding)
        state, m = step(state, batch)
        out.append({k: float(m[k]) for k in metrics})
      hlo = step.lower(state, batch).compile().as_text()  # The executable compiled above.
    query = state[0]['blocks']['attn']['query']['kernel']
    query = query.get_value() if isinstance(query, nnx.Variable) else query
    runs[name] = (out, {'query_shard': query.addressable_shards[0].data.shape,
                        'query_spec': query.sharding.spec, 'hlo': hlo})
  return runs


def _max_diff(got, ref, keys=('loss',)) -> float:
  return max(abs(a[k] - b[k]) for a, b in zip(got, ref) for k in keys)


def test_pipeline_gives_the_same_losses_as_no_pipeline():
  """One test (not a module fixture) so that xdist workers never train the layouts twice."""
  runs = train_all({name: _config(**ov) for name, ov in LAYOUTS.items()})
  ref = runs['dp'][0]
  assert len(ref) == STEPS and ref[-1]['loss'] < ref[0]['loss'] - 0.3, ref
  diffs = {name: _max_diff(got, ref) for name, (got, _) in runs.items()}
  print(f'loss(dp) {ref[0]["loss"]:.4f} -> {ref[-1]["loss"]:.4f}; max |diff| {diffs}')  # -rP
  assert max(diffs.values()) <= ATOL, f'max |loss - loss(dp)| per layout: {diffs} > {ATOL}'
  for name, ov in LAYOUTS.items():
    if name == 'dp':
      continue
    shards = runs[name][1]
    # The layer stack is split over the stages: [4 layers, 32, 4 heads, 8] per device.
    want = (4 // ov['mesh.stage'], 32 // ov.get('mesh.fsdp', 1),
            4 // ov.get('mesh.tensor', 1), 8)
    assert shards['query_shard'] == want, (name, shards['query_shard'])
    assert shards['query_spec'][0] == 'stage', (name, shards['query_spec'])
    # The stage shift is a collective-permute (not an all-gather of the activations).
    assert 'collective-permute' in shards['hlo'], name


def test_moe_pipeline_equals_gradient_accumulation():
  """MoE x pipeline x expert parallelism: total loss, CE and both aux losses per step."""
  runs = train_all({name: _moe_config(**ov) for name, ov in MOE_LAYOUTS.items()},
                   metrics=MOE_METRICS)
  ref, got = runs['moe_dp_accum2'][0], runs['moe_s2_expert2'][0]
  assert ref[-1]['loss'] < ref[0]['loss'] - 0.2, ref
  diff = _max_diff(got, ref, MOE_METRICS)
  print(f'moe: loss {ref[0]["loss"]:.4f} -> {ref[-1]["loss"]:.4f}; max |diff| {diff:.3g}')  # -rP
  assert diff <= ATOL, f'max |metric - metric(accum)| = {diff:.3g} > {ATOL}'


# --------------------------------------------------------------------------- schedule


def _toy(S, M, R, layers=8, batch=16):
  """pipeline.run on a toy layer (matmul + tanh + per-example bias) against a scan."""
  from jax.ad_checkpoint import checkpoint_name
  w = jax.random.normal(jax.random.key(0), (layers, 8, 8)) * 0.3
  x = jax.random.normal(jax.random.key(1), (batch, 4, 8))
  bias = jax.random.normal(jax.random.key(2), (batch, 4))
  target = jax.random.normal(jax.random.key(3), (batch, 4, 8))  # Rows must stay in place.

  def layer(x, w_b):
    w, b = w_b
    return jnp.tanh(checkpoint_name(x, pl.LAYER_INPUT) @ w + b[..., None]), jnp.sum(x)

  def plain(w, x):
    x, aux = jax.lax.scan(lambda x, w: layer(x, (w, bias)), x, w)
    return jnp.mean((x - target) ** 2), jnp.sum(aux)

  def stage_fn(ws, x, b):
    x, aux = jax.lax.scan(lambda x, w: layer(x, (w, b)), x, ws)
    return x, {'aux': jnp.sum(aux)}

  mesh = jax.make_mesh((8 // S, S), ('data', 'stage'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    ws = jax.device_put(w, NamedSharding(mesh, P('stage')))

    def piped(w, x):
      y, aux = pl.run(stage_fn, w, x, bias, pl.Schedule(S, M, R),
                      activation_spec=P('data', None, None))
      return jnp.mean((y - target) ** 2), aux['aux']

    (got, got_aux), g = jax.jit(jax.value_and_grad(piped, has_aux=True))(ws, x)
  (want, want_aux), g_want = jax.value_and_grad(plain, has_aux=True)(w, x)
  return (float(got), float(want)), (float(got_aux), float(want_aux)), (g, g_want)


@pytest.mark.parametrize('S, M, R, B', [(2, 1, 1, 16), (4, 4, 2, 16)])
def test_schedule_matches_the_plain_scan(S, M, R, B):
  """Values, gradients and the summed aux output: GPipe with M < S, circular with
  M == S (M > S, the circular buffer, is the trainer layout circular_s2_fsdp2_tp2);
  1e-6 relative (float32, other summation order)."""
  (got, want), (aux, aux_want), (g, g_want) = _toy(S, M, R, batch=B)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(aux, aux_want, rtol=1e-5)  # Bubble iterations excluded.
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), atol=1e-7, rtol=1e-5)


def test_schedule_arithmetic():
  sch = pl.Schedule(stages=4, microbatches=8, repeats=2)
  assert sch.iterations == 19 and abs(sch.bubble_fraction - 3 / 19) < 1e-12
  assert pl.resolve(4, num_layers=8, schedule='circular') == pl.Schedule(4, 4, 2)
  assert pl.resolve(2, num_layers=8, microbatches=6) == pl.Schedule(2, 6, 1)


# --------------------------------------------------------------------------- trainer


@pytest.mark.parametrize('overrides, needles', [
    ({'mesh.data': 4, 'mesh.stage': 2, 'model.scan_layers': False}, ['model.scan_layers']),
    ({'mesh.data': 1, 'mesh.stage': 8, 'model.num_layers': 4},
     ['model.num_layers=4', 'mesh.stage*pipeline_repeats=8*1=8']),
    ({'mesh.data': 2, 'mesh.stage': 4, 'model.num_layers': 6}, ['model.num_layers=6']),
    ({'mesh.data': 4, 'mesh.stage': 2, 'model.pipeline_microbatches': 3},
     ['batch_size=16', 'model.pipeline_microbatches=3']),
    ({'mesh.data': 4, 'mesh.stage': 2, 'model.pipeline_schedule': 'interleaved'},
     ['model.pipeline_schedule']),
    ({'mesh.data': 4, 'mesh.stage': 2, 'model.pipeline_repeats': 2}, ["'circular'"]),
    ({'mesh.data': 2, 'mesh.stage': 4, 'model.pipeline_schedule': 'circular',
      'model.num_layers': 8, 'model.pipeline_microbatches': 2},
     ['model.pipeline_microbatches=2', 'mesh.stage=4']),
    ({'mesh.data': 4, 'mesh.stage': 2, 'model.dropout': 0.1}, ['model.dropout']),
    ({'mesh.data': 3, 'mesh.stage': 2}, ['= 6 but there are 8 devices']),
])
def test_bad_pipeline_config_fails_in_one_line_before_compiling(tmp_path, overrides, needles):
  assert_one_line_config_error_before_compiling(_config(**overrides), tmp_path, needles)
