"""Data, FSDP and tensor parallelism on 8 fake CPU devices (conftest), proven equivalent.

The same 20-step training run (a 2-layer, 8-head model on the built-in corpus) under
five meshes and on one device must give the same losses to float32 tolerance; the
parameters and the Adam state must really be split (per-device shard shapes); a
checkpoint written under one mesh must resume under another; a wrong mesh must fail
before anything is compiled, with a message naming the axis and the numbers.
"""

from __future__ import annotations

import os
import shutil
import threading
import types

import jax
import numpy as np
import pytest
from flax import nnx

from research import sharding as shd
from research.config import ConfigError
from tests.helpers import (assert_one_line_config_error_before_compiling, run_cli,
                           smoke_config)

STEPS = 20
# float32 tolerance on the per-step loss (5.35 -> 3.36 nats over the 20 steps): the
# meshes sum the same numbers in different orders (sharded matmuls, all-reduce vs local
# sums), so losses differ in the last bits. Measured: max |diff| 1.4e-6 (3 float32 ulps
# at loss ~5) over the 20 steps on every mesh. 2e-5 absolute (~5e-6 relative) is 14x
# that; a real sharding bug (e.g. gradients not reduced across data shards) changes
# the update itself, not its last bits. The learning rate is
# moderate on purpose: at 1e-2 this model trains at the edge of stability (loss
# spikes) and amplifies the same last-bit differences to ~1e-4 by step 20.
ATOL = 2e-5
MESHES = {  # name: (data, fsdp, tensor)
    'dp': (8, 1, 1),
    'fsdp': (1, 8, 1),
    'tp': (1, 1, 8),
    'dp2_tp4': (2, 1, 4),
    'dp2_fsdp2_tp2': (2, 2, 2),
}
MODEL = {'model.num_heads': 8, 'model.d_model': 64, 'model.mlp_dim': 128}
# backend_defaults=False: the model as written (autodiff projections), the reference of
# test_transpose_input_projections_train_the_same_under_fsdp_and_tp.
RUN = {'batch_size': 16, 'steps': STEPS, 'log_every': 1, 'eval_steps': 0,
       'checkpoint_every': 1000, 'num_samples': 0, 'optimizer.learning_rate': 3e-3,
       'optimizer.warmup_steps': 5, 'backend_defaults': False}


def _config(mesh=(8, 1, 1), **overrides):
  d, f, t = mesh
  return smoke_config(**{**MODEL, **RUN, 'mesh.data': d, 'mesh.fsdp': f, 'mesh.tensor': t,
                         **overrides})


def _losses(workdir):
  from research.metrics import read_metrics
  return {r['step']: r['loss'] for r in read_metrics(workdir) if r['split'] == 'train'}


# Arrays whose shards the tests inspect: parameter path in the model state (the Adam
# moments mu/nu have the same paths under the optimizer state).
INSPECTED = {
    'query': ('blocks', 'attn', 'query', 'kernel'),
    'wi_0': ('blocks', 'mlp', 'wi_0', 'kernel'),
    'wo': ('blocks', 'mlp', 'wo', 'kernel'),
    'embed': ('embed', 'embedding'),
}


def _leaf(state, path):
  for p in path:
    state = state[p]
  return state[...] if isinstance(state, nnx.Variable) else state


def _describe_shards(ts) -> dict:
  """Per-device shard shapes of the trained params and their Adam moments."""
  model, opt = ts.state[0], ts.state[1]
  adam = opt['opt_state'][1][0]  # chain(clip, adamw, schedule...): the scale_by_adam state.
  out = {}
  for key, path in INSPECTED.items():
    arrays = {'param': _leaf(model, path), 'mu': _leaf(adam['mu'], path),
              'nu': _leaf(adam['nu'], path)}
    out[key] = {what: {'n_shards': len(a.addressable_shards),
                       'shard_shape': a.addressable_shards[0].data.shape,
                       'sharding': a.sharding, 'replicated': a.sharding.is_fully_replicated}
                for what, a in arrays.items()}
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Trains the same run under every mesh (and on 1 device in a subprocess).

  The trainer's own state is captured (a spy on ``create_train_state``; the loop
  updates that TrainState in place), so the shard shapes inspected are those of the
  arrays the 20 steps actually trained.
  """
  import research.train as train_lib
  from research import recipe
  root = tmp_path_factory.mktemp('meshes')
  one = {}
  args = ['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
          f'--workdir={root / "one_device"}', '--config.mesh.data=1']
  args += [f'--config.{k}={v}' for k, v in {**MODEL, **RUN}.items()]
  thread = threading.Thread(target=lambda: one.update(r=run_cli(args, devices=1)))
  thread.start()  # Overlaps with the in-process runs below.
  out, shards, created = {}, {}, []

  def spy(*args, **kwargs):
    ts = real_create(*args, **kwargs)
    created.append(ts)
    return ts

  real_create = train_lib.create_train_state
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train_lib, 'create_train_state', spy)
    for name, mesh in MESHES.items():
      wd = str(root / name)
      # The DP run also checkpoints at step 10, for the cross-mesh resume test.
      recipe.run(_config(mesh, **({'checkpoint_every': 10} if name == 'dp' else {})), wd)
      out[name] = wd
      shards[name] = _describe_shards(created.pop())
  thread.join()
  assert one['r'].returncode == 0, one['r'].stderr[-3000:]
  out['one_device'] = str(root / 'one_device')
  out['shards'] = shards
  return out


def test_same_losses_on_every_mesh_and_one_device(runs):
  ref = _losses(runs['dp'])
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert ref[STEPS] < ref[1] - 1.0, 'the model did not learn'
  for name in [*MESHES, 'one_device']:
    got = _losses(runs[name])
    assert sorted(got) == sorted(ref), name
    diff = max(abs(got[s] - ref[s]) for s in ref)
    assert diff <= ATOL, f'{name}: max |loss - loss(dp)| = {diff:.3g} > {ATOL}'


# Per-device shard shapes, hand-computed. Parameter shapes: query kernel [layers=2,
# embed=64, heads=8, head_dim=8] (FSDP on embed, TP on heads); MLP in [2, 64, mlp=128];
# MLP out [2, 128, 64]; embedding [vocab 259 padded to 384, 64] (TP on vocab, FSDP on
# embed). 'batch': rows of the [16, 32] batch per device (split over data x fsdp).
EXPECTED_SHARDS = {
    'dp': {'query': (2, 64, 8, 8), 'wi_0': (2, 64, 128), 'wo': (2, 128, 64),
           'embed': (384, 64), 'batch': 2},
    'fsdp': {'query': (2, 8, 8, 8), 'wi_0': (2, 8, 128), 'wo': (2, 128, 8),
             'embed': (384, 8), 'batch': 2},
    'tp': {'query': (2, 64, 1, 8), 'wi_0': (2, 64, 16), 'wo': (2, 16, 64),
           'embed': (48, 64), 'batch': 16},
    'dp2_tp4': {'query': (2, 64, 2, 8), 'wi_0': (2, 64, 32), 'wo': (2, 32, 64),
                'embed': (96, 64), 'batch': 8},
    'dp2_fsdp2_tp2': {'query': (2, 32, 4, 8), 'wi_0': (2, 32, 64), 'wo': (2, 64, 32),
                      'embed': (192, 32), 'batch': 4},
}
FULL = {'query': (2, 64, 8, 8), 'wi_0': (2, 64, 128), 'wo': (2, 128, 64), 'embed': (384, 64)}


@pytest.mark.parametrize('name', list(MESHES))
def test_trained_params_and_adam_state_are_sharded(runs, name):
  want = EXPECTED_SHARDS[name]
  for key, arrays in runs['shards'][name].items():
    for what, info in arrays.items():
      assert info['n_shards'] == 8
      assert info['shard_shape'] == want[key], (name, key, what, info['shard_shape'])
      # Adam's moments live exactly where their parameter lives.
      assert info['sharding'] == arrays['param']['sharding'], (name, key, what)
      assert info['replicated'] == (want[key] == FULL[key]), (name, key, what)
  mesh = shd.make_mesh(*MESHES[name])
  rows = shd.named(mesh, ('batch', 'seq')).shard_shape((16, 32))[0]
  assert rows == want['batch'], (name, rows)


def test_init_is_sharded_on_every_device_never_whole():
  """The jitted initializer's per-device output is the shard, not the full state."""
  from research.tasks import make_task
  from research.train_state import _state_factory, abstract_train_state
  c = _config(MESHES['fsdp'], **{'model.vocab_size': 259})
  mesh = shd.mesh_from_config(c.mesh)
  task = make_task(c)
  ts = abstract_train_state(c, mesh, task)
  create, _ = _state_factory(c, task)
  with shd.use_mesh(mesh):
    compiled = jax.jit(lambda: nnx.state(create()), out_shardings=ts.shardings).lower().compile()
  mem = compiled.memory_analysis()
  whole = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(ts.state)
              if jax.dtypes.issubdtype(x.dtype, np.floating))
  per_device = shd.per_device_bytes(ts.state)
  assert per_device < whole / 6  # Nearly everything is split 8 ways (norms are not).
  assert mem.output_size_in_bytes <= per_device * 1.05, (mem.output_size_in_bytes, per_device)
  assert mem.temp_size_in_bytes < whole / 2, (mem.temp_size_in_bytes, whole)


def test_checkpoint_from_one_mesh_resumes_on_another(runs, tmp_path):
  """Saved under DP (8,1,1) at step 10, resumed under (2,2,2): same losses 11..20."""
  from research.recipe import run as train
  wd = str(tmp_path / 'resumed')
  shutil.copytree(runs['dp'], wd)
  shutil.rmtree(os.path.join(wd, 'checkpoints', str(STEPS)))  # As if stopped at step 10.
  summary = train(_config(MESHES['dp2_fsdp2_tp2']), wd)
  assert summary['resumed_from_step'] == 10
  ref, got = _losses(runs['dp']), _losses(wd)
  assert sorted(got) == list(range(1, STEPS + 1))  # No duplicated or missing rows.
  diff = max(abs(got[s] - ref[s]) for s in range(11, STEPS + 1))
  assert diff <= ATOL, diff


def test_transpose_input_projections_train_the_same_under_fsdp_and_tp(runs, tmp_path):
  """model.projection_vjp='transpose_input' (its hand-written backward transposes
  sharded activations) under (2,2,2) gives the DP autodiff run's losses."""
  from research.recipe import run as train
  wd = str(tmp_path / 'transpose_input')
  train(_config(MESHES['dp2_fsdp2_tp2'], **{'model.projection_vjp': 'transpose_input'}), wd)
  ref, got = _losses(runs['dp']), _losses(wd)
  assert sorted(got) == sorted(ref)
  diff = max(abs(got[s] - ref[s]) for s in ref)
  assert diff <= ATOL, diff


@pytest.mark.parametrize('overrides, needles', [
    ({'mesh.data': 3}, ['mesh: data*fsdp*tensor = 3*1*1 = 3', '8 devices']),
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 4}, ['= 16', '8 devices']),
    ({'mesh.data': 1, 'mesh.tensor': 8, 'model.num_heads': 4},
     ['mesh.tensor=8', 'model.num_heads=4']),
    ({'mesh.data': 2, 'mesh.tensor': 4, 'model.mlp_dim': 90},
     ['mesh.tensor=4', 'model.mlp_dim=90']),
    ({'mesh.data': 8, 'batch_size': 12}, ['batch_size=12', 'mesh.data*mesh.fsdp=8*1=8']),
    ({'mesh.data': 1, 'mesh.fsdp': 8, 'model.d_model': 52, 'model.num_heads': 2},
     ['mesh.fsdp=8', "'embed', size 52"]),
    ({'mesh.data': 4, 'mesh.sequence': 2, 'seq_len': 31}, ['seq_len=31', 'mesh.sequence=2']),
    ({'mesh.expert': 2}, ['mesh.expert=2']),
    ({'mesh.rules': 'embed=fsdpp'}, ['mesh.rules', "mesh axis 'fsdpp'"]),
    ({'mesh.rules': 'embd=fsdp'}, ['mesh.rules', "logical axis 'embd'"]),
    ({'mesh.rules': 'mlp=fsdp', 'mesh.data': 1, 'mesh.fsdp': 8},
     ['mesh.rules', "mesh axis 'fsdp'"]),
])
def test_wrong_mesh_fails_before_compiling(tmp_path, overrides, needles):
  assert_one_line_config_error_before_compiling(_config(**overrides), tmp_path, needles)


def test_wrong_mesh_on_the_command_line_is_one_line():
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               '--workdir=/tmp/unused_wrong_mesh', '--config.mesh.data=3'], devices=8,
              env={'JAX_LOG_COMPILES': '1'})
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and '= 3 but there are 8 devices' in errors[0], r.stderr[-2000:]
  assert 'Compiling' not in r.stderr and 'Traceback' not in r.stderr


def test_rules_from_config_override_one_row():
  from research.tasks import make_task
  from research.train_state import abstract_train_state
  c = _config((1, 8, 1), **{'model.vocab_size': 259, 'mesh.rules': 'embed=none, mlp=tensor'})
  mesh = shd.mesh_from_config(c.mesh)
  ts = abstract_train_state(c, mesh, make_task(c))
  query = ts.state[0]['blocks']['attn']['query']['kernel']
  query = query.get_value() if isinstance(query, nnx.Variable) else query
  assert query.sharding.is_fully_replicated  # FSDP on weights switched off...
  rules = shd.rules_from_config(c.mesh)
  assert shd.named(mesh, ('batch', 'seq'), rules).shard_shape((16, 32)) == (2, 32)  # ...batch still split.
  assert dict(rules)['embed'] is None and dict(rules)['mlp'] == 'tensor'


def test_sequence_axis_gives_the_same_logits():
  """The sequence-parallel seam: activations split on 'seq' change nothing numerically."""
  from research.models.transformer import Transformer
  c = _config(**{'model.vocab_size': 259})
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 259)
  forward = nnx.jit(lambda m, t: m(t))  # Jitted both times: one compile, not one per op.
  want = forward(Transformer(c.model, rngs=nnx.Rngs(params=0)), tokens)
  mesh = shd.make_mesh(2, 1, 2, sequence=2)
  with shd.use_mesh(mesh):
    sharded = Transformer(c.model, rngs=nnx.Rngs(params=0))
    got = forward(sharded, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_multi_slice_layout_puts_data_across_slices():
  """dcn_data=2: the data axis's outer half is one slice (here: process), inner the other."""
  fake = [types.SimpleNamespace(id=i, process_index=i // 4, platform='cpu', device_kind='cpu')
          for i in range(8)]
  arr = shd.hybrid_device_array((4, 2, 1, 1, 1), 2, fake)
  assert arr.shape == (4, 2, 1, 1, 1)
  procs = np.vectorize(lambda d: d.process_index)(arr)
  assert (procs[:2] == 0).all() and (procs[2:] == 1).all()
  with pytest.raises(ConfigError, match='mesh.dcn_data=2 but the 8 devices form 1 processes'):
    shd.make_mesh(4, 2, 1, dcn_data=2)
