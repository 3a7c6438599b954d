"""The benchmark runs at smoke size and writes its JSON (no timing assertions)."""

import json

from tests.helpers import run_cli


def test_benchmark_writes_report(tmp_path):
  out = tmp_path / 'benchmark.json'
  r = run_cli(['launch.benchmark', '--config=experiments/pretrain/tiny.py:smoke=True',
               '--steps=2', '--warmup=1', f'--out={out}'])
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  for key in ('compile_s', 'step_time_s', 'tokens_per_sec', 'model_tflops_per_sec', 'mfu',
              'peak_flops_source', 'memory_analysis', 'param_count'):
    assert key in report, key
  assert report['step_time_s'] > 0 and report['tokens_per_sec'] > 0
  assert report['peak_flops_source'] == 'measured:cpu_matmul'
