"""Multi-process runs on one machine: detection, launch.local, equal losses, resume.

The training comparisons use tiny.py:smoke=True for 20 steps: one process with 8
CPU devices (in this pytest process, see conftest.py) against two processes with 4
devices each started by ``launch.local``. Train losses must agree to rtol 1e-5
(measured: identical or 1 ulp apart, ~1e-7 relative; the two runs reduce across
devices in a different order).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from research import distributed as dist
from tests.helpers import MULTI_PROCESS_RUN, REPO, train_losses, suite_xla_flags

RTOL = 1e-5
# Same run for every launcher (conftest.py's reference_losses is its one-process run).
STEPS = MULTI_PROCESS_RUN['steps']
TRAIN_FLAGS = ['--config=experiments/pretrain/tiny.py:smoke=True'] + [
    f'--config.{k}={v}' for k, v in MULTI_PROCESS_RUN.items()]


def assert_same_losses(got: dict[int, float], want: dict[int, float], min_steps: int) -> None:
  common = sorted(set(got) & set(want))
  assert len(common) >= min_steps, (sorted(got), sorted(want))
  np.testing.assert_allclose([got[s] for s in common], [want[s] for s in common], rtol=RTOL,
                             err_msg=f'steps {common}')


def _local(args: list[str], workdir=None, **popen) -> subprocess.Popen:
  env = dict(os.environ)
  env['XLA_FLAGS'] = suite_xla_flags()  # launch.local sets each process's device count.
  return subprocess.Popen([sys.executable, '-m', 'launch.local', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _run_local(args: list[str], timeout: float = 300) -> tuple[int, str]:
  p = _local(args)
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


# ----------------------------------------------------------------------- detection


def test_single_process_needs_no_initialisation():
  assert dist.detect({}) is None
  assert dist.detect({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_STEP_NUM_TASKS': '1',
                      'SLURM_STEP_NODELIST': 'n1', 'SLURM_NTASKS': '1'}) is None
  assert dist.detect({}, num_processes=1) is None
  assert dist.detect({'OMPI_COMM_WORLD_SIZE': '4'}, method='off') is None


def test_explicit_from_flags_and_env():
  s = dist.detect({}, coordinator_address='10.0.0.1:1234', num_processes=4, process_id=3)
  assert s == dist.ProcessSpec('explicit', '10.0.0.1:1234', 4, 3)
  env = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'}
  assert dist.detect(env) == dist.ProcessSpec('explicit', 'h:1', 2, 1)
  with pytest.raises(dist.DistributedError, match='process id 5'):
    dist.detect({}, coordinator_address='h:1', num_processes=2, process_id=5)
  with pytest.raises(dist.DistributedError, match='coordinator_address'):
    dist.detect({}, num_processes=2, process_id=0)


def test_slurm_detection():
  env = {'SLURM_JOB_ID': '4097', 'SLURM_PROCID': '3', 'SLURM_NTASKS': '4',
         'SLURM_STEP_NUM_TASKS': '4', 'SLURM_STEP_NODELIST': 'gpu[007-009,012],cpu1',
         'SLURM_JOB_NODELIST': 'gpu[007-009,012],cpu1'}
  s = dist.detect(env)
  assert s == dist.ProcessSpec('slurm', 'gpu007:61441', 4, 3)  # JAX's port rule.
  assert dist.detect({**env, 'JAX_COORDINATOR_PORT': '5555'}).coordinator_address == 'gpu007:5555'
  assert dist.detect(env, port=6000).coordinator_address == 'gpu007:6000'
  # The batch script itself (outside srun) is one process even with --ntasks=4.
  batch = {k: v for k, v in env.items() if not k.startswith('SLURM_STEP')}
  assert dist.detect(batch) is None
  with pytest.raises(dist.DistributedError, match='not a slurm environment'):
    dist.detect(batch, method='slurm')
  assert dist.first_slurm_host('node01') == 'node01'
  assert dist.first_slurm_host('a-b[1-2],c') == 'a-b1'
  assert dist.first_slurm_host('host3,host1') == 'host3'


def test_ompi_k8s_tpu_detection():
  ompi = {'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '1',
          'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911'}
  s = dist.detect(ompi)
  assert (s.method, s.coordinator_address.split(':')[0], s.num_processes, s.process_id) == (
      'ompi', '10.96.0.1', 2, 1)
  k8s = {'JOB_COMPLETION_INDEX': '1', 'JAX_NUM_PROCESSES': '2',
         'JAX_COORDINATOR_ADDRESS': 'train-0.train:1234'}
  assert dist.detect(k8s) == dist.ProcessSpec('k8s', 'train-0.train:1234', 2, 1)
  with pytest.raises(dist.DistributedError, match='JAX_NUM_PROCESSES'):
    dist.detect({'JOB_COMPLETION_INDEX': '0'})
  assert dist.detect({'TPU_WORKER_HOSTNAMES': 'w0,w1'}).method == 'tpu'
  assert dist.detect({}, method='tpu').method == 'tpu'
  assert dist.detect({'TPU_WORKER_HOSTNAMES': 'w0'}) is None


# ----------------------------------------------------------------------- processes


def test_local_launcher_all_reduce():
  rc, out = _run_local(['--num_processes=2', '--devices_per_process=2',
                        '--module=launch.cluster.check'], timeout=120)
  assert rc == 0, out[-3000:]
  assert '[p0] check: process 0/2 devices 2/4 sum=6 ok' in out, out[-3000:]
  assert '[p1] check: process 1/2 devices 2/4 sum=6 ok' in out, out[-3000:]


def test_dead_process_does_not_hang_the_others():
  """Process 1 dies after init; JAX stops process 0 (launch.local is told to wait)."""
  t = time.time()
  rc, out = _run_local(['--num_processes=2', '--devices_per_process=1', '--grace_s=120',
                        '--module=launch.cluster.check', '--', '--crash_process=1',
                        '--distributed_heartbeat_timeout_s=5',
                        '--distributed_shutdown_timeout_s=5'], timeout=120)
  elapsed = time.time() - t
  assert rc == 3, out[-3000:]  # The first failure's code.
  assert 'simulates a crash' in out
  assert 'killing the remaining' not in out, 'process 0 did not stop by itself'
  assert elapsed < 60, elapsed


def _wait_for_init(p: subprocess.Popen, n: int, lines: list[str]) -> None:
  seen = set()
  for line in p.stdout:
    lines.append(line)
    if 'jax.distributed: process' in line:
      seen.add(line.split()[0])
      if len(seen) == n:
        return
  raise AssertionError('the processes never initialised:\n' + ''.join(lines[-50:]))


def test_two_processes_match_one_and_resume_after_preemption(tmp_path, reference_losses):
  """Two processes x 4 devices, preempted once and resumed: every step's loss (those of
  the first start and those after the resume) equals the one-process run's."""
  want = reference_losses
  assert set(range(2, STEPS + 1)) <= set(want), sorted(want)

  # Preempted: SIGTERM to launch.local (forwarded to both processes) once they are up;
  # they agree on a step, save it and exit 75. The rerun resumes and ends the same.
  wd = tmp_path / 'preempted'
  p = _local(['--num_processes=2', '--devices_per_process=4', '--', *TRAIN_FLAGS,
              f'--workdir={wd}'])
  lines: list[str] = []
  try:
    _wait_for_init(p, 2, lines)
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
  out = ''.join(lines) + rest
  assert p.returncode == 75, out[-5000:]
  assert 'jax.distributed: process 1 of 2 via explicit' in out
  saved = [int(s) for s in os.listdir(wd / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < STEPS, saved
  first = {s: v for s, v in train_losses(wd).items() if s <= saved[0]}
  assert first, 'no step logged before the preemption'
  rc, out = _run_local(['--num_processes=2', '--devices_per_process=4', '--', *TRAIN_FLAGS,
                        f'--workdir={wd}'])
  assert rc == 0, out[-5000:]
  assert 'jax.distributed: process 1 of 2 via explicit' in out
  assert f'Resumed from step {saved[0]}' in out
  cfg = json.load(open(wd / 'config.json'))
  assert (cfg['process_count'], cfg['device_count']) == (2, 8)
  resumed = train_losses(wd)
  assert max(resumed) == STEPS
  assert {s: resumed[s] for s in first} == first  # The first start's rows are kept.
  # Before the preemption and after the resume alike: the one-process losses.
  assert_same_losses(resumed, want, min_steps=STEPS - 1)
