"""TPU ahead-of-time plans with the real TPU compiler (libtpu) on a CPU-only machine.

These tests need the TPU venv (requirements-tpu.txt; .ci/run creates it in about a
minute). They do not skip without it: a missing venv fails with the one command that
creates it, because the planner's TPU path would otherwise go untested.
"""

from __future__ import annotations

import json
import os

import pytest

from research import topology
from tests.helpers import run_cli

TPU_PYTHON = os.environ.get('RESEARCH_TPU_PYTHON', '/opt/tpu-venv/bin/python')
SMOKE = ['--config=experiments/pretrain/llama.py:smoke=True', '--config.model.dtype=bfloat16',
         '--config.batch_size=8']


def test_the_tpu_venv_exists():
  from launch.plan import TPU_VENV_COMMAND
  assert os.access(TPU_PYTHON, os.X_OK), (
      f'{TPU_PYTHON} is missing: create it with `{TPU_VENV_COMMAND}` (see requirements-tpu.txt)')


def test_topology_names_cloud_and_libtpu_forms():
  t = topology.parse('v5p-256')
  assert (t.name, t.chips_per_slice, t.cloud_name) == ('v5p:4x4x8', 128, 'v5p-256')
  assert topology.parse('v5p-1024').name == 'v5p:8x8x8'
  assert topology.parse('v5e-256').name == 'v5e:16x16'
  assert topology.parse('v6e:8x8', num_slices=2).num_devices == 128
  assert topology.parse('v5e:2x2x1').name == 'v5e:2x2'
  for bad, needle in (('v5p-128x', 'expected GEN'), ('v5e:4x4x4', '2-D'),
                      ('v7x:2x2', 'expected GEN'), ('v5p-3', 'multiple of 2'),
                      ('v5e:32x32', 'largest v5e slice')):
    with pytest.raises(topology.TopologyError, match=needle) as e:
      topology.parse(bad)
    assert '\n' not in str(e.value)


def test_smoke_plan_compiles_with_the_tpu_compiler(tmp_path):
  """From this (CPU) Python: launch.plan re-executes in the TPU venv and compiles."""
  out = tmp_path / 'plan.json'
  r = run_cli(['launch.plan', *SMOKE, '--topology=v5e:2x2', f'--out={out}'], timeout=900,
              env={'RESEARCH_TPU_PYTHON': TPU_PYTHON})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert 're-running with' in r.stderr
  rep = json.loads(out.read_text())
  assert rep['platform'] == 'tpu' and rep['device_kind'] == 'TPU v5 lite'
  assert rep['devices'] == 4 and rep['compiled'] and rep['fits'] is True
  assert rep['device_memory_gb'] == pytest.approx(15.75)  # The compiler's v5e HBM.
  # FLOPs from the lowered module with loop trip counts: full remat = ~8N/6N.
  ratio = rep['flops']['hlo_matmul_flops_per_step'] / rep['flops']['model_flops_per_step_6N']
  assert 1.1 < ratio < 1.5, ratio
  te = rep['time_estimate']
  assert te['compiler_optimal_seconds'] > 0 and te['loop_factor'] > 1.0  # Scanned layers.
  assert te['step_s'] >= te['compute_s'] > te['compiler_optimal_seconds']
  assert rep['collectives']['all-reduce']['per_step'] >= 1  # data=4: gradients reduced.
  for needle in ('on v5e:2x2', 'analytic estimate', 'step time estimate', 'fits in 15.75 GiB: yes'):
    assert needle in r.stdout, r.stdout


def test_search_ranks_what_fits_by_the_compilers_estimate(tmp_path):
  out = tmp_path / 'search.json'
  r = run_cli(['launch.plan', *SMOKE, '--topology=v5e:2x2', '--search', '--max_compiles=2',
               '--search_remat=full,dots_with_no_batch_dims_saveable', '--search_accum=1',
               '--search_tensor=1', f'--out={out}'], timeout=900,
              env={'RESEARCH_TPU_PYTHON': TPU_PYTHON})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.loads(out.read_text())
  # data x fsdp = 4 ways x 2 policies: 3 factorisations (1x4, 2x2, 4x1) x 2 = 6.
  assert res['candidates'] == 6 and res['compiled'] == 2 and len(res['ranked']) == 2
  steps = [row['report']['step_s'] for row in res['ranked']]
  assert steps == sorted(steps) and steps[0] > 0
  assert len(res['not_compiled']) == 4
  assert '| rank | data | fsdp | tensor | remat |' in r.stdout


def test_missing_tpu_python_is_one_line_with_the_fix():
  r = run_cli(['launch.plan', *SMOKE, '--topology=v5e:2x2'],
              env={'RESEARCH_TPU_PYTHON': '/nonexistent/python'})
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'requirements-tpu.txt' in errors[0], r.stderr[-2000:]
