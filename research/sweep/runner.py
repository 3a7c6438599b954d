"""Running a sweep's trainers: subprocesses on this machine, N at a time.

Each run is its ``launch.train`` command in its own process (and process group), its
stdout+stderr appended to ``DIR/<run>/train.log``. Failures are recorded and the sweep
goes on; on SIGINT/SIGTERM the running trainers get one SIGTERM (they save a checkpoint
and exit 75) and are recorded as interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from research.run_logs import SUMMARY
from research.sweep.plan import Run, seeded_label
from research.sweep.status import (FAILED, INTERRUPTED, OK, PREEMPTED, is_finished,
                                   write_status)

LOG = 'sweep.log'  # The trainer's stdout+stderr as captured (its own log: train.log).
EXIT_PREEMPTED = 75  # research.runtime.EXIT_PREEMPTED (not imported: keeps this module light).


class Interrupted(Exception):
  """The sweep was stopped by a signal after its running trainers were stopped."""

  def __init__(self, signum: int):
    super().__init__(f'interrupted by {signal.Signals(signum).name}')
    self.signum = signum


def error_from_log(text: str, tail: int = 5) -> str:
  """The trainer's last ``error: ...`` line, else its last ``tail`` non-empty lines."""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  for ln in reversed(lines):
    if ln.startswith('error:'):
      return ln[len('error:'):].strip()
  return ' | '.join(lines[-tail:])[-600:]


# ---------------------------------------------------------------------------------
# Execution.


@dataclasses.dataclass
class _Active:
  run: Run
  proc: subprocess.Popen
  log: Any
  log_offset: int
  start: float


def _death_signal_hook() -> Callable[[], None] | None:
  """A preexec_fn giving the trainer SIGTERM (save, stop) if the sweep dies (Linux)."""
  if sys.platform != 'linux':
    return None
  try:
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Loaded in the parent, not the child.
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG.


def _start(run: Run, env: Mapping[str, str]) -> _Active:
  os.makedirs(run.workdir, exist_ok=True)
  log = open(os.path.join(run.workdir, LOG), 'ab')
  log.write(f'=== launch.sweep {time.strftime("%Y-%m-%d %H:%M:%S")}: '
            f'{shlex.join(run.command)}\n'.encode())
  log.flush()
  offset = log.tell()
  write_status(run, status='running', returncode=None, error='')
  proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True,
                          preexec_fn=_death_signal_hook())
  return _Active(run, proc, log, offset, time.time())


def _finish(a: _Active, returncode: int, *, interrupted: bool = False) -> dict[str, Any]:
  a.log.close()
  with open(os.path.join(a.run.workdir, LOG), 'rb') as f:
    f.seek(a.log_offset)
    text = f.read().decode(errors='replace')
  wall = round(time.time() - a.start, 1)
  if returncode == 0 and is_finished(a.run):
    status, error = OK, ''
  elif interrupted:
    status, error = INTERRUPTED, f'stopped by the sweep (exit {returncode}); rerun to resume'
  elif returncode == EXIT_PREEMPTED:
    status, error = PREEMPTED, error_from_log(text) or 'preempted; rerun to resume'
  else:
    status = FAILED
    error = (f'exit 0 but no {SUMMARY}' if returncode == 0 else
             error_from_log(text) or f'exit {returncode}')
  fields = {'status': status, 'returncode': returncode, 'error': error, 'wall_s': wall}
  write_status(a.run, **fields)
  return {'name': a.run.name, **fields}


def _stop(active: Sequence[_Active], grace_s: float) -> None:
  """SIGTERM every trainer (they save and exit 75); SIGKILL after grace_s or a 2nd ^C."""
  for a in active:
    if a.proc.poll() is None:
      try:
        os.killpg(a.proc.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.time() + grace_s
  try:
    while any(a.proc.poll() is None for a in active) and time.time() < deadline:
      time.sleep(0.2)
  except KeyboardInterrupt:
    pass
  for a in active:
    if a.proc.poll() is None:
      try:
        os.killpg(a.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      a.proc.wait()


def execute(runs: Sequence[Run], *, parallel: int = 1, env: Mapping[str, str] | None = None,
            log: Callable[[str], None] = print, grace_s: float = 120.0
            ) -> list[dict[str, Any]]:
  """Runs ``runs`` (unfinished ones only), ``parallel`` at a time; continues past failures.

  Returns one outcome per started run: {'name', 'status', 'returncode', 'error', 'wall_s'}.
  On KeyboardInterrupt or :class:`Interrupted` the running trainers get SIGTERM (they
  save a checkpoint), are recorded as interrupted, and :class:`Interrupted` is raised.
  """
  env = dict(os.environ if env is None else env)
  if parallel > 1:
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # Share one GPU's memory.
  todo = [r for r in runs if not is_finished(r)]
  for r in runs:
    if is_finished(r):
      log(f'[sweep] done already: {r.name} ({seeded_label(r)})')
  total, outcomes, active = len(todo), [], []
  queue = list(todo)
  try:
    while queue or active:
      while queue and len(active) < max(1, parallel):
        run = queue.pop(0)
        log(f'[sweep] start {total - len(queue)}/{total}: {run.name} ({seeded_label(run)})')
        active.append(_start(run, env))
      time.sleep(0.1)
      for a in list(active):
        rc = a.proc.poll()
        if rc is None:
          continue
        active.remove(a)
        out = _finish(a, rc)
        outcomes.append(out)
        err = f': {out["error"]}' if out['error'] else ''
        log(f'[sweep] {out["status"]} ({out["wall_s"]:.0f} s): {a.run.name}{err}')
  except (KeyboardInterrupt, Interrupted) as e:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    log(f'[sweep] {signal.Signals(signum).name}: stopping {len(active)} running trainer(s)')
    _stop(active, grace_s)
    for a in active:
      outcomes.append(_finish(a, a.proc.returncode, interrupted=True))
    raise Interrupted(signum) from None
  return outcomes
