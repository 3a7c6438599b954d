"""Test setup: 8 fake CPU devices (set before jax is imported) and shared helpers."""

import os

# LLVM's optimisation level 0 for XLA:CPU's generated code: the suite's programs are
# small and compile for longer than they run (test_sharding.py: 141 -> 114 CPU-s); the
# HLO passes, and so what is computed, are unchanged. Subprocesses inherit it.
_flags = os.environ.get('XLA_FLAGS', '').split()
for _flag in ('--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0'):
  if _flag not in _flags:  # xdist workers inherit the controller's environment.
    _flags.append(_flag)
os.environ['XLA_FLAGS'] = ' '.join(_flags)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import pytest  # noqa: E402  (after the environment above, as jax reads it at import)


@pytest.fixture(scope='session', autouse=True)
def _session_compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for this test session, shared by the xdist
  workers: a program compiled again (a resumed run's step, the same smoke model trained
  by another test) is loaded instead of compiled. It starts empty every session, so a
  first compilation is never skipped; tracing still runs every time (tests counting
  traces still see them). Subprocesses keep their own cache (research/compile_cache.py).
  """
  import importlib.util

  import jax
  from jax._src import compilation_cache
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  jax.config.update('jax_compilation_cache_dir', str(shared / 'xla_compilation_cache'))
  # Small programs compile faster than they load; the trainer's steps take seconds.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if importlib.util.find_spec('filelock'):  # A size bound turns on JAX's file lock
    jax.config.update('jax_compilation_cache_max_size', 2 << 30)  # (two workers write).
  compilation_cache.reset_cache()  # Anything compiled before (at import) saw no cache.
  yield


@pytest.fixture(scope='session')
def reference_losses(tmp_path_factory) -> dict[int, float]:
  """{step: train loss} of helpers.MULTI_PROCESS_RUN trained in this pytest process (one
  process, 8 devices): the reference of the multi-process tests (test_distributed.py,
  test_data_sharding.py). Trained once per session, shared by the xdist workers."""
  import fcntl
  import json

  import jax

  from research.recipe import run as train
  from tests.helpers import MULTI_PROCESS_RUN, smoke_config, train_losses
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  result = shared / 'single_process_losses.json'
  with open(shared / 'single_process_losses.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Other workers wait for the first one's result.
    if not result.exists():
      assert jax.device_count() == 8 and jax.process_count() == 1
      workdir = tmp_path_factory.mktemp('single')
      train(smoke_config(**MULTI_PROCESS_RUN), str(workdir))
      result.write_text(json.dumps(train_losses(workdir)))
  return {int(k): v for k, v in json.loads(result.read_text()).items()}
