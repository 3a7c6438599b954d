"""The benchmark runs at smoke size and writes its JSON (no timing assertions)."""

import json

from tests.helpers import run_cli


def test_benchmark_writes_report(tmp_path):
  out = tmp_path / 'benchmark.json'
  r = run_cli(['launch.benchmark', '--config=experiments/pretrain/tiny.py:smoke=True',
               '--steps=2', '--warmup=1', f'--out={out}', '--config.backend_defaults=True'],
              env={'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache')})
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  for key in ('compile_s', 'step_time_s', 'tokens_per_sec', 'model_tflops_per_sec', 'mfu',
              'peak_flops_source', 'memory_analysis', 'param_count', 'cpu_s_per_step',
              'time_to_first_step_s', 'step_times_s', 'model'):
    assert key in report, key
  assert report['step_time_s'] > 0 and report['tokens_per_sec'] > 0
  assert len(report['step_times_s']) == 2 and report['cpu_s_per_step'] > 0
  # Imports, init and compilation come before the first step.
  assert report['time_to_first_step_s'] >= report['compile_s'] + report['init_s']
  # The roofline is measured in this process, with its method, not read from a cache.
  assert report['peak_flops_source'] == 'measured:cpu_matmul_in_process'
  roof = report['roofline']
  assert roof['flops'] == max(roof['per_size_flops'].values()) == report['peak_flops_total']
  assert 'measured in the benchmark process' in roof['method']
  assert abs(report['mfu'] - report['model_tflops_per_sec'] * 1e12 / roof['flops']) < 1e-9
  # The execution choices recipe.run makes on CPU (on by default) are the ones benchmarked.
  assert report['backend_defaults'] == {'model.projection_vjp': 'transpose_input',
                                        'model.scan_unroll': 0}
  assert report['model']['projection_vjp'] == 'transpose_input'
  assert report['compilation_cache_dir'] == str(tmp_path / 'jax_cache')
