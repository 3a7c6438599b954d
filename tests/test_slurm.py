"""Real Slurm jobs on a one-node cluster started here (tests/slurm_cluster.py).

``launch.slurm`` submits 2-task sbatch jobs; each task is one JAX process that finds
its id and the coordinator in the Slurm environment (no explicit flags):
  * the training job's losses match a single process with 8 devices (rtol 1e-5);
  * a job whose processes exit 75 (as after a preemption save) is requeued by its
    script and runs again (``launch.cluster.check --preempt_once``).

Needs slurm-wlm and munge (.ci/install_slurm.sh) and root. Without them the tests
are skipped locally but fail under CI=true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests import slurm_cluster
from tests.helpers import REPO
from tests.test_distributed import STEPS, TRAIN_FLAGS, assert_same_losses, train_losses


@pytest.fixture(scope='module')
def cluster():
  missing = slurm_cluster.missing_binaries()
  reason = None
  if missing:
    reason = f'Slurm binaries missing: {missing} (run .ci/install_slurm.sh)'
  elif os.geteuid() != 0:
    reason = 'the local Slurm cluster needs root'
  if reason:
    if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
      pytest.fail(f'{reason}; the Slurm tests may not be skipped in CI.')
    pytest.skip(reason)
  c = slurm_cluster.LocalSlurm(cpus=4).start()
  yield c
  c.stop()


def _submit(cluster, args: list[str]) -> str:
  r = subprocess.run([sys.executable, '-m', 'launch.slurm', *args], cwd=REPO,
                     env=cluster.env(), capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  job = r.stdout.strip().split(';')[0]
  assert job.isdigit(), r.stdout
  return job


def test_sbatch_two_tasks_train_like_one_process(cluster, tmp_path, reference_losses):
  t0 = time.time()
  wd, log = tmp_path / 'run', tmp_path / 'job.out'
  job = _submit(cluster, [
      '--job_name=jax-2task', '--nodes=1', '--tasks_per_node=2', '--time=00:15:00',
      f'--output={log}', '--env=JAX_PLATFORMS=cpu',
      '--env=XLA_FLAGS=--xla_force_host_platform_device_count=4',
      '--', *TRAIN_FLAGS, f'--workdir={wd}'])
  state = cluster.wait_job(job, timeout=400)
  elapsed = time.time() - t0
  out = log.read_text() if log.exists() else '(no log)'
  assert state == 'COMPLETED 0:0', out[-5000:]
  # The job's log: both tasks found their place from Slurm's env, and it ended well.
  for task in (0, 1):
    assert f'{task}: ' in out  # srun --label prefixes.
    assert f'jax.distributed: process {task} of 2 via slurm' in out, out[-5000:]
  assert out.rstrip().endswith('launch.slurm: exit code 0'), out[-2000:]
  got = train_losses(wd)
  assert max(got) == STEPS
  assert_same_losses(got, reference_losses, min_steps=STEPS - 1)
  print(f'slurm training job {job}: submit to completion {elapsed:.1f}s')


def test_sbatch_requeues_after_preemption_exit(cluster, tmp_path):
  t0 = time.time()
  log, marker = tmp_path / 'job.out', tmp_path / 'preempted-once'
  job = _submit(cluster, [
      '--job_name=requeue', '--tasks_per_node=2', '--time=00:10:00', f'--output={log}',
      '--env=JAX_PLATFORMS=cpu', '--module=launch.cluster.check', '--',
      f'--preempt_once={marker}'])
  state = cluster.wait_job(job, timeout=300)
  out = log.read_text() if log.exists() else '(no log)'
  assert state == 'COMPLETED 0:0', out[-5000:]
  assert 'launch.slurm: exit code 75' in out, out[-5000:]
  assert f'launch.slurm: preempted after a checkpoint: requeueing job {job}' in out
  assert 'restart 1' in out  # SLURM_RESTART_COUNT of the requeued run.
  # Both runs checked the all-reduce (sbatch exports the submitter's XLA_FLAGS).
  assert len(re.findall(r'check: process 1/2 devices \d+/\d+ sum=\d+ ok', out)) == 2, out[-5000:]
  assert out.rstrip().endswith('launch.slurm: exit code 0'), out[-2000:]
  print(f'slurm requeue job {job}: submit to completion {time.time() - t0:.1f}s')
