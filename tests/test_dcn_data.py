"""mesh.dcn_data without slice information: processes act as slices (or a one-line error).

CPU and GPU devices report ``slice_index`` 0 for every device even in a multi-process
job (seen with jax 0.10.2: 2 processes x 2 CPU devices all have slice_index 0), which
made ``mesh.dcn_data=2`` fail with "the devices form 1 slices". Now the processes are
the granules when the slices do not separate the devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from research import sharding as shd
from research.config import ConfigError
from tests.helpers import REPO, suite_xla_flags


def fake(i: int, process: int, slice_index):
  return SimpleNamespace(id=i, process_index=process, slice_index=slice_index)


def test_granules_are_slices_when_they_differ_else_processes():
  tpu = [fake(i, i // 4, i // 8) for i in range(16)]  # 2 slices of 2 hosts.
  assert shd.dcn_granules(tpu, 2) == (True, {0, 1})
  cpu = [fake(i, i // 2, 0) for i in range(4)]  # What a 2-process CPU/GPU job reports.
  assert shd.dcn_granules(cpu, 2) == (False, {0, 1})
  none = [fake(i, i // 2, None) for i in range(4)]
  assert shd.dcn_granules(none, 2) == (False, {0, 1})


def test_mismatched_dcn_data_names_the_count_and_the_fix():
  cpu = [fake(i, i // 2, 0) for i in range(4)]
  with pytest.raises(ConfigError) as e:
    shd.hybrid_device_array((4, 1, 1, 1, 1), 4, cpu)
  msg = str(e.value)
  assert '\n' not in msg
  assert 'mesh.dcn_data=4 but the 4 devices form 2 processes' in msg
  assert 'set mesh.dcn_data=2' in msg


def test_two_processes_train_with_dcn_data_2(tmp_path):
  """launch.local: 2 processes x 2 CPU devices, the data axis laid out across them."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = suite_xla_flags()  # launch.local sets each process's device count.
  wd = tmp_path / 'dcn'
  r = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--devices_per_process=2',
       '--', '--config=experiments/pretrain/tiny.py:smoke=True', f'--workdir={wd}',
       '--config.steps=3', '--config.log_every=1', '--config.eval_every=3',
       '--config.checkpoint_every=3', '--config.num_samples=0', '--config.mesh.data=-1',
       '--config.mesh.dcn_data=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  cfg = json.load(open(wd / 'config.json'))
  assert (cfg['process_count'], cfg['device_count']) == (2, 4)
  assert cfg['config']['mesh']['dcn_data'] == 2 and cfg['mesh_shape']['data'] == 4
  rows = [json.loads(l) for l in open(wd / 'metrics.jsonl')]
  losses = [row['loss'] for row in rows if row['split'] == 'train']
  assert len(losses) == 3 and all(l == l for l in losses)
