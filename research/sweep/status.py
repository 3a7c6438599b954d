"""The state of a sweep's runs on disk: finished, failed, pending, and what a rerun does.

A run is finished when its ``summary.json`` exists. ``DIR/<run>/sweep_status.json``
records the status, exit code and error of the last local attempt.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from typing import Any, Sequence

from research.run_logs import METRICS, SUMMARY, read_json
from research.sweep.plan import Plan, Run, write_atomic, seeded_label

STATUS = 'sweep_status.json'
# Status values of a run, in the order a summary prefers to report them.
OK, FAILED, PREEMPTED, INTERRUPTED, INCOMPLETE, PENDING = (
    'ok', 'failed', 'preempted', 'interrupted', 'incomplete', 'pending')


def is_finished(run: Run) -> bool:
  return os.path.isfile(os.path.join(run.workdir, SUMMARY))


def run_state(run: Run) -> tuple[str, str]:
  """(status, error) from the run directory: summary.json wins, then sweep_status.json."""
  if is_finished(run):
    return OK, ''
  st = read_json(os.path.join(run.workdir, STATUS)) or {}
  status = st.get('status', '')
  if status in (FAILED, PREEMPTED, INTERRUPTED):
    return status, st.get('error', '')
  if status == OK:  # Exit 0 but the summary is gone.
    return FAILED, f'{SUMMARY} missing'
  started = any(os.path.exists(os.path.join(run.workdir, f))
                for f in (METRICS, 'checkpoints', 'config.json'))
  return (INCOMPLETE if started else PENDING), ''


def write_status(run: Run, **fields: Any) -> None:
  fields = {'name': run.name, 'index': run.index, **fields,
            'command': shlex.join(run.command), 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
  write_atomic(os.path.join(run.workdir, STATUS), json.dumps(fields, indent=2) + '\n')


def plan_state(run: Run) -> str:
  """What running the sweep would do with this run: done, resume or new."""
  if is_finished(run):
    return 'done'
  if os.path.isdir(os.path.join(run.workdir, 'checkpoints')):
    return 'resume'
  return 'new'


def describe_plan(plan: Plan, selected: Sequence[Run], parallel: int) -> str:
  """The ``--dry_run`` listing: per selected run its index, state, directory and
  settings, then its command."""
  states = {r.index: plan_state(r) for r in selected}
  n_done = sum(s == 'done' for s in states.values())
  lines = [f'sweep of {plan.config}: {len(selected)} of {len(plan.runs)} runs selected, '
           f'{n_done} done, {len(selected) - n_done} to run (parallel={parallel})']
  for r in selected:
    lines.append(f'{r.index:4d}  {states[r.index]:<6}  {r.name}  {seeded_label(r)}')
    lines.append(f'      {shlex.join(r.command)}')
  return '\n'.join(lines) + '\n'
