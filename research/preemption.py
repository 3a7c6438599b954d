"""Preemption: SIGTERM/SIGINT finish the current step, save, and exit with 75.

Single process: our own signal handler sets a flag that the loop reads after each
step. Several processes: jax.distributed's preemption service (it catches SIGTERM on
any host and agrees on a common safe step) is asked through
``multihost_utils.reached_preemption_sync_point`` so all hosts save the same step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Raised after the preemption checkpoint is saved; the entry point exits 75."""

  def __init__(self, step: int):
    super().__init__(f'preempted: saved a checkpoint at step {step}; rerun to resume.')
    self.step = step


class PreemptionWatcher:
  """Tells the loop when to save and stop. Use as a context manager."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = {}
    self.multi_process = jax.process_count() > 1

  def __enter__(self) -> 'PreemptionWatcher':
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _on_signal(self, signum, frame) -> None:
    if self._flag.is_set():  # Second signal: the user insists.
      raise KeyboardInterrupt
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process."""
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step) or self._flag.is_set()
    return self._flag.is_set()
