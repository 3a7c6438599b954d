"""The workdir lock: one job per workdir, a clear message naming the holder, and no
stale lock after the holder is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from research import workdir_lock
from research.workdir_lock import WorkdirBusyError, hold
from tests.helpers import REPO

_HOLDER = textwrap.dedent('''
    import sys, time
    from research.workdir_lock import hold
    with hold(sys.argv[1]):
      print('held', flush=True)
      time.sleep(600)
''')

_TRY = textwrap.dedent('''
    import sys
    from research.workdir_lock import hold
    from research.runtime import UserError
    try:
      with hold(sys.argv[1]):
        print('acquired')
    except UserError as e:
      print('error:', e)
''')


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', code, *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _start_holder(workdir) -> subprocess.Popen:
  p = _python(_HOLDER, str(workdir))
  assert p.stdout.readline().strip() == 'held', p.stderr.read()
  return p


def test_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
  wd = tmp_path / 'run'
  with hold(str(wd)):
    out, err = _python(_TRY, str(wd)).communicate(timeout=60)
  assert out.count('\n') == 1, (out, err)
  line = out.strip()
  assert line.startswith(f'error: workdir {wd} is in use by pid {os.getpid()} on '), line
  assert 'since' in line and 'wait for it or use another --workdir' in line, line
  # The record names the holder's command line; the lock is free once we left.
  record = json.loads((wd / '.lock').read_text())
  assert record['pid'] == os.getpid() and record['command']
  out, _ = _python(_TRY, str(wd)).communicate(timeout=60)
  assert out.strip() == 'acquired'


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  wd = tmp_path / 'run'
  holder = _start_holder(wd)
  try:
    with pytest.raises(WorkdirBusyError, match=f'in use by pid {holder.pid} on '):
      with hold(str(wd)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  assert holder.returncode == -signal.SIGKILL
  t0 = time.monotonic()
  with hold(str(wd)):  # No cleanup needed: the kernel dropped the flock.
    assert json.loads((wd / '.lock').read_text())['pid'] == os.getpid()
  assert time.monotonic() - t0 < 5


def test_reentrant_in_one_process_and_released_after(tmp_path):
  wd = str(tmp_path / 'run')
  with hold(wd):
    with hold(wd):  # E.g. launch.train holds it and recipe.run holds it again.
      pass
    out, _ = _python(_TRY, wd).communicate(timeout=60)
    assert out.startswith('error: workdir'), out  # Still held by the outer block.
  assert not workdir_lock._held
  out, _ = _python(_TRY, wd).communicate(timeout=60)
  assert out.strip() == 'acquired'


def test_only_process_zero_of_a_job_locks(tmp_path):
  """Processes 1..N-1 of a job share the workdir with process 0: they take no lock."""
  wd = tmp_path / 'run'
  holder = _start_holder(wd)
  try:
    with hold(str(wd), primary=False):  # Would be refused if it tried to lock.
      pass
  finally:
    holder.kill()
    holder.wait(timeout=60)


def test_busy_message_without_a_record(tmp_path):
  msg = workdir_lock.busy_message('/x', None)
  assert msg == 'workdir /x is in use by another process; wait for it or use another --workdir.'


def _start_train(workdir, *extra) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
       f'--workdir={workdir}', '--config.log_every=1', '--config.num_samples=0', *extra],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_two_trainings_started_together_one_is_refused(tmp_path):
  wd = tmp_path / 'run'
  procs = [_start_train(wd, '--config.steps=8'), _start_train(wd, '--config.steps=8')]
  results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
  codes = sorted(rc for rc, _ in results)
  assert codes == [0, 1], [(rc, err[-1500:]) for rc, err in results]
  err = next(err for rc, err in results if rc == 1)
  last = err.strip().splitlines()[-1]
  winner = next(p.pid for p, (rc, _) in zip(procs, results) if rc == 0)
  assert last.startswith(f'error: workdir {wd} is in use by pid {winner} on '), err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  from research.metrics import read_metrics
  steps = [r['step'] for r in read_metrics(str(wd)) if r['split'] == 'train']
  assert steps == list(range(1, 9)), steps  # Each step exactly once.
  log = (wd / 'train.log').read_text()
  assert log.count('===== attempt started') == 2 and 'is in use by pid' in log


_JOB_PROCESS = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import jax
    workdir, port, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=index)
    from research.workdir_lock import hold_for_job
    from research.runtime import UserError
    try:
      with hold_for_job(workdir):
        print('acquired', flush=True)
    except UserError as e:
      print('error:', e, flush=True)
''')


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_job(workdir) -> list[str]:
  """Two processes of one jax.distributed job call hold_for_job; their stdout lines."""
  port = str(_free_port())
  procs = [_python(_JOB_PROCESS, str(workdir), port, str(i)) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
  return [out.strip().splitlines()[-1] for out, _ in outs]  # After gloo's chatter.


def test_a_multi_process_job_shares_the_lock_and_a_refused_job_stops_everywhere(tmp_path):
  wd = tmp_path / 'run'
  assert _run_job(wd) == ['acquired', 'acquired']  # Process 1 is not refused by process 0.
  holder = _start_holder(wd)
  try:
    out0, out1 = _run_job(wd)
  finally:
    holder.kill()
    holder.wait(timeout=60)
  assert out0.startswith(f'error: workdir {wd} is in use by pid {holder.pid} on '), out0
  assert out1.startswith(f'error: workdir {wd} is in use by another job'), out1
