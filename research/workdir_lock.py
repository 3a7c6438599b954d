"""One job per workdir: an advisory ``flock`` on ``WORKDIR/.lock``.

Two trainings on one workdir interleave checkpoint saves and append the same steps to
``metrics.jsonl`` twice. ``hold(workdir)`` refuses the second one at once with a
one-line :class:`WorkdirBusyError` naming the holder.

Why ``fcntl.flock`` and not "create the file if absent": the kernel drops a flock when
its holder dies for any reason (``kill -9``, OOM kill, power loss of a local disk), so
a stale lock never needs cleaning up; the file itself stays and only documents the
last holder (host, pid, start time, command line, job id).

Several processes of one job (``jax.distributed``) share the workdir by design, so a
lock per process would refuse the job's own processes. The job holds the lock through
its process 0 only (``primary=True``); the other processes trust it. This is safe
because the other processes of a job cannot outlive process 0 for long (it runs the
jax.distributed coordinator). :func:`hold_for_job` does that and, in a multi-process
job, tells every process whether process 0 got the lock, so all processes of a
refused job stop with the same one-line error instead of waiting on a collective.

NFS: flock over NFSv4 is forwarded to the server (Linux >= 2.6.12) and works across
hosts; on file systems without locks ``flock`` raises ENOLCK and we proceed with a
warning rather than refuse every run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator

from research import runtime
from research.runtime import UserError

LOCK_NAME = '.lock'

# Re-entrancy: a process that already holds a workdir (e.g. a recipe that calls the
# trainer on its own workdir) may hold it again; flock on a second open file
# description of the same file would refuse our own process.
_held: dict[str, list[Any]] = {}  # realpath -> [file object, depth]
_held_guard = threading.Lock()


class WorkdirBusyError(UserError):
  """Another live process holds the workdir's lock."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_NAME)


def job_id() -> str:
  """A label for the lock record: the scheduler's job id where there is one, else this
  process's pid and host (informational; the lock itself is the flock)."""
  for var in ('SLURM_JOB_ID', 'JOB_ID', 'TPU_WORKER_ID'):
    if os.environ.get(var):
      return f'{var.lower()}={os.environ[var]}'
  return f'pid={os.getpid()}@{socket.gethostname()}'


def holder_info() -> dict[str, Any]:
  """What the lock file records about its holder."""
  return {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'since': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
      'command': runtime.command_line(),
      'job': job_id(),
  }


def read_holder(workdir: str, wait_s: float = 1.0) -> dict[str, Any] | None:
  """The holder recorded in the lock file; waits briefly for a holder that has the lock
  but has not written its record yet."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      with open(lock_path(workdir)) as f:
        text = f.read().strip()
      if text:
        return json.loads(text)
    except (OSError, ValueError):
      pass
    if time.monotonic() >= deadline:
      return None
    time.sleep(0.05)


def busy_message(workdir: str, holder: dict[str, Any] | None) -> str:
  if not holder:
    who = 'another process'
  else:
    command = holder.get('command', '?')
    if len(command) > 200:
      command = command[:200] + '...'
    who = (f'pid {holder.get("pid", "?")} on {holder.get("host", "?")} since '
           f'{holder.get("since", "?")} ({command})')
  return f'workdir {workdir} is in use by {who}; wait for it or use another --workdir.'


def _acquire(workdir: str) -> Any:
  """Opens and flocks the lock file (non-blocking); returns the open file."""
  os.makedirs(workdir, exist_ok=True)
  f = open(lock_path(workdir), 'a+')
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.close()
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise WorkdirBusyError(busy_message(workdir, read_holder(workdir))) from None
    if e.errno == errno.ENOLCK:  # A file system without locks: do not refuse every run.
      from absl import logging
      logging.warning('workdir %s: file locks are not supported here; two runs on this '
                      'workdir would not be prevented.', workdir)
      return None
    raise
  # We hold it: record who we are (truncate what a previous holder wrote).
  f.seek(0)
  f.truncate()
  f.write(json.dumps(holder_info()) + '\n')
  f.flush()
  return f


@contextlib.contextmanager
def hold(workdir: str, *, primary: bool = True) -> Iterator[None]:
  """Holds ``workdir`` for the duration of the block; raises WorkdirBusyError at once
  if another live process holds it. ``primary=False`` (processes 1..N-1 of a job) is
  a no-op: process 0 holds the lock for the whole job."""
  if not primary:
    yield
    return
  key = os.path.realpath(workdir)
  with _held_guard:
    entry = _held.get(key)
    if entry is not None:
      entry[1] += 1
    else:
      _held[key] = [_acquire(workdir), 1]
  try:
    yield
  finally:
    with _held_guard:
      entry = _held[key]
      entry[1] -= 1
      if entry[1] == 0:
        del _held[key]
        if entry[0] is not None:
          # Keep the file (it documents the last holder); closing drops the flock.
          entry[0].close()


@contextlib.contextmanager
def hold_for_job(workdir: str) -> Iterator[None]:
  """``hold`` for every process of a (possibly multi-process) jax job.

  Process 0 takes the lock; in a multi-process job it then broadcasts whether it got
  it, so the other processes of a refused job raise the same kind of one-line error
  instead of hanging in the first collective. Call after ``jax.distributed`` is set up.
  """
  import jax
  if jax.process_count() == 1:
    with hold(workdir):
      yield
    return
  import numpy as np
  from jax.experimental import multihost_utils
  primary = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    error: WorkdirBusyError | None = None
    try:
      stack.enter_context(hold(workdir, primary=primary))
    except WorkdirBusyError as e:
      error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not ok:
      raise WorkdirBusyError(
          f'workdir {workdir} is in use by another job (process 0 of this job was refused '
          f'its lock; see {lock_path(workdir)}); wait for it or use another --workdir.')
    yield
