"""Backend execution choices change how a step runs, not the run's losses."""

import os

import jax
import numpy as np
import pytest

from research import backend_defaults, compile_cache
from tests.helpers import smoke_config


def test_cpu_gets_its_execution_choices_and_accelerators_nothing():
  c = smoke_config()  # backend_defaults=True is the default.
  assert backend_defaults.overrides(c, 'cpu') == {
      'model.projection_vjp': 'transpose_input', 'model.scan_unroll': 0}
  for backend in ('gpu', 'tpu', 'cuda', 'rocm'):
    assert backend_defaults.overrides(c, backend) == {}
  before = c.to_dict()
  assert backend_defaults.apply(c, 'tpu', 1) == {} and c.to_dict() == before
  assert not any('scan_layers' in k for k in backend_defaults.overrides(c, 'cpu'))
  # small.py's 32 x 256 tokens: 8 micro-batches of 1,024 tokens; only on one device.
  big = smoke_config(batch_size=32, seq_len=256, **{'model.max_seq_len': 256})
  assert backend_defaults.overrides(big, 'cpu')['optimizer.grad_accum_steps'] == 8
  # 8 fake devices on 2 cores (the test meshes): more devices than cores, none.
  assert 'optimizer.grad_accum_steps' not in backend_defaults.overrides(big, 'cpu', 8, cores=2)
  # One device per core: 1,024 tokens in all, 512 on each of the two.
  assert backend_defaults.overrides(big, 'cpu', 2, cores=2)['optimizer.grad_accum_steps'] == 8


def test_cpu_micro_batches_keep_a_cache_sized_micro_batch():
  assert backend_defaults.cpu_micro_batches(32, 256) == 8   # small.py: 4 x 256 each.
  assert backend_defaults.cpu_micro_batches(32, 128) == 4   # tiny.py: 8 x 128.
  assert backend_defaults.cpu_micro_batches(12, 64) == 1    # nanoGPT's 4x128 shape.
  assert backend_defaults.cpu_micro_batches(6, 256) == 1    # 3 x 256 < 1,024 tokens.
  assert backend_defaults.cpu_micro_batches(32, 128, 2) == 4  # 2 devices x 4 x 128.
  assert backend_defaults.cpu_micro_batches(12, 128, 8) == 1  # 12 / k never splits 8 ways.


def test_one_cpu_device_per_core_for_narrow_models_on_the_default_mesh():
  c = smoke_config(batch_size=12)
  assert backend_defaults.cpu_device_count(c, cores=2) == 2
  assert backend_defaults.cpu_device_count(c, cores=8) == 6  # The most dividing 12.
  assert backend_defaults.cpu_device_count(smoke_config(batch_size=7), cores=2) == 1
  for changes in ({'backend_defaults': False}, {'mesh.fsdp': 2}, {'mesh.data': 2},
                  {'model.d_model': 512, 'model.num_heads': 8},
                  {'quant.mode': 'qat', 'quant.weight_bits': 8},
                  {'batch_ramp.boundaries': (2,), 'batch_ramp.batch_sizes': (6,)}):
    assert backend_defaults.cpu_device_count(smoke_config(batch_size=12, **changes),
                                             cores=2) == 1, changes


_SET_DEVICES = '''
import jax
from research import backend_defaults
from tests.helpers import smoke_config
c = smoke_config(batch_size=12)
print(backend_defaults.set_cpu_devices(c), jax.device_count(),
      backend_defaults.cpu_device_count(c, backend_defaults.usable_cores()))
'''


@pytest.mark.parametrize('forced', [False, True])
def test_set_cpu_devices_before_jax_starts(forced):
  # A fresh process: JAX's backends start once. A device count the user (or a test's
  # XLA_FLAGS) chose is left alone.
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  if forced:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', _SET_DEVICES], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  returned, devices, wanted = map(int, out.stdout.split())
  if forced:
    assert (returned, devices) == (0, 3)
  else:
    assert returned == wanted == devices


@pytest.mark.parametrize('changes', [{'backend_defaults': False},
                                     {'quant.mode': 'qat', 'quant.weight_bits': 8},
                                     {'finetune.mode': 'lora'}])
def test_left_as_written(changes):
  c = smoke_config(**changes)
  assert backend_defaults.overrides(c, 'cpu') == {}


@pytest.mark.parametrize('changes', [{'optimizer.grad_accum_steps': 2},
                                     {'batch_ramp.boundaries': (2,),
                                      'batch_ramp.batch_sizes': (16,)}])
def test_explicit_accumulation_or_a_ramp_is_not_micro_batched(changes):
  c = smoke_config(batch_size=32, seq_len=256, **{'model.max_seq_len': 256}, **changes)
  got = backend_defaults.overrides(c, 'cpu')
  assert 'optimizer.grad_accum_steps' not in got and got['model.scan_unroll'] == 0


def _losses(config, steps=4):
  from research import recipe
  from research import sharding as shd
  from research import step as step_lib
  from research.benchmark import synthetic_batch
  from research.train_state import create_train_state
  config, task, _ = recipe.compose(config, build_tokenizer=False)
  mesh = shd.mesh_from_config(config.mesh)
  ts = create_train_state(config, mesh, task)
  sharding = step_lib.batch_sharding(mesh, config)
  step = step_lib.make_train_step(config, task, ts, sharding)
  out, state = [], ts.state
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    for i in range(steps):
      config.seed = i  # A different batch each step.
      state, m = step(state, synthetic_batch(config, sharding))
      out.append(float(m['loss']))
  return np.array(out), jax.tree.leaves(jax.device_get(state))


def test_cpu_choice_keeps_the_losses():
  # The GPT-2-style block the side-by-side benchmark runs; the SwiGLU block's projections
  # are covered by tests/test_projection.py (gradients vs autodiff, whole Transformer).
  from benchmarks.side_by_side import GPT2_BLOCK
  extra = GPT2_BLOCK
  # 64 x 32 tokens: two micro-batches of 1,024 on CPU, so every choice is exercised.
  written = smoke_config(**extra, batch_size=64, backend_defaults=False)
  chosen = smoke_config(**extra, batch_size=64, backend_defaults=True)
  assert backend_defaults.apply(chosen, 'cpu', 1) == {
      'model.projection_vjp': 'transpose_input', 'model.scan_unroll': 0,
      'optimizer.grad_accum_steps': 2}
  l0, p0 = _losses(written)
  l1, p1 = _losses(chosen)
  assert l0[-1] < l0[0]
  np.testing.assert_allclose(l1, l0, rtol=2e-5)
  for a, b in zip(p0, p1):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                               rtol=1e-3, atol=2e-5)


def test_compilation_cache_env(monkeypatch, tmp_path):
  for k in (compile_cache.CACHE_ENV, compile_cache.CACHE_SIZE_ENV,
            compile_cache.CACHE_OFF_ENV):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.enable_compilation_cache() == str(
      tmp_path / 'research' / 'jax_compilation_cache')
  assert os.environ[compile_cache.CACHE_SIZE_ENV] == str(compile_cache.CACHE_MAX_BYTES)
  monkeypatch.delenv(compile_cache.CACHE_SIZE_ENV)
  monkeypatch.setenv(compile_cache.CACHE_ENV, '/elsewhere')
  assert compile_cache.enable_compilation_cache() == '/elsewhere'
  assert compile_cache.CACHE_SIZE_ENV not in os.environ  # Theirs, as they set it.
  monkeypatch.delenv(compile_cache.CACHE_ENV)
  monkeypatch.setenv(compile_cache.CACHE_OFF_ENV, '0')
  assert compile_cache.enable_compilation_cache() is None
  assert compile_cache.CACHE_ENV not in os.environ
