r"""Writes sbatch scripts: one task per JAX process, requeue after a preemption save.

A single job (``srun`` starts ``nodes * tasks_per_node`` tasks; each task is one JAX
process that finds its id from ``SLURM_PROCID`` through ``research/distributed.py``):

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --time=04:00:00 \
      --partition=gpu --account=myproj -- \
      --config=experiments/pretrain/small.py --workdir=/shared/runs/small

A sweep as an array job: array task ``i`` runs line ``i+1`` of ``DIR/commands.txt``
(one shell-quoted command per line, as ``launch.sweep`` writes it):

  python -m launch.slurm --sweep_dir=/shared/sweeps/width --max_parallel=4 --gpus_per_node=1

Preemption: the job is submitted ``--requeue`` with ``--signal=TERM@GRACE`` so the
trainer gets SIGTERM ``--signal_grace_s`` before the time limit; it saves and exits
with ``EXIT_PREEMPTED`` (75), and the script then runs ``scontrol requeue`` on its
own job (at most ``--max_requeues`` times, counted by ``SLURM_RESTART_COUNT``). The
requeued job resumes from the checkpoint in the same workdir and appends to the
same log (``--open-mode=append``).

GPUs: with one task per node the task owns all ``--gpus_per_node`` GPUs; with
several tasks per node each gets ``gpus_per_node / tasks_per_node`` of them through
``--gpus-per-task`` (Slurm binds them, so each process sees only its own).

Tasks stop together: ``srun --wait=W`` kills the remaining tasks W seconds after
the first one ends (a crash also makes JAX abort the others: see
research/distributed.py for the heartbeat and shutdown timeouts).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Sequence

from launch.cluster.common import (LaunchError, check_single_line, check_token,
                                   export_lines, program)
from research import gpu_env
from research.runtime import EXIT_PREEMPTED


@dataclasses.dataclass
class SlurmOptions:
  job_name: str = 'research'
  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int = 0  # 0: Slurm's default.
  mem: str = ''  # Per node, e.g. '200G'; '' for Slurm's default.
  time: str = '01:00:00'
  partition: str = ''
  account: str = ''
  qos: str = ''
  output: str = ''  # '' -> slurm-%x-%j.out (arrays: slurm-%x-%A_%a.out) in chdir.
  chdir: str = ''  # '' -> the directory launch.slurm runs in.
  sbatch_lines: Sequence[str] = ()  # Extra directives: '--constraint=h100' or '#SBATCH ...'.
  setup: Sequence[str] = ()  # Shell lines run before srun (module load, venv...). Raw shell.
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  python: str = sys.executable
  module: str = 'launch.train'
  port: int = 0  # Coordinator port; 0: derived from the job id.
  requeue: bool = True
  signal_grace_s: int = 120  # SIGTERM this long before the time limit; 0: none.
  max_requeues: int = 20
  wait_s: int = 60  # srun --wait: kill the other tasks this long after one ends.
  max_parallel: int = 0  # Array jobs: at most this many tasks at once (0: no limit).

  @property
  def num_tasks(self) -> int:
    return self.nodes * self.tasks_per_node


def _directives(o: SlurmOptions, array: str | None) -> list[str]:
  for name in ('job_name', 'time', 'partition', 'account', 'qos', 'mem'):
    check_token(f'--{name}', getattr(o, name))
  for name in ('output', 'chdir'):
    if any(c in getattr(o, name) for c in ' \t\n\r\'"'):
      raise LaunchError(f'--{name}={getattr(o, name)!r}: #SBATCH paths may not contain '
                        'spaces or quotes.')
  if o.nodes < 1 or o.tasks_per_node < 1:
    raise LaunchError('--nodes and --tasks_per_node must be >= 1.')
  d = [f'--job-name={o.job_name}', f'--nodes={o.nodes}',
       f'--ntasks-per-node={o.tasks_per_node}', f'--time={o.time}']
  if o.gpus_per_node:
    if o.tasks_per_node == 1:
      d.append(f'--gpus-per-node={o.gpus_per_node}')
    elif o.gpus_per_node % o.tasks_per_node:
      raise LaunchError(f'--gpus_per_node={o.gpus_per_node} is not a multiple of '
                        f'--tasks_per_node={o.tasks_per_node}.')
    else:
      d.append(f'--gpus-per-task={o.gpus_per_node // o.tasks_per_node}')
  if o.cpus_per_task:
    d.append(f'--cpus-per-task={o.cpus_per_task}')
  for name, flag in (('mem', 'mem'), ('partition', 'partition'), ('account', 'account'),
                     ('qos', 'qos')):
    if getattr(o, name):
      d.append(f'--{flag}={getattr(o, name)}')
  output = o.output or ('slurm-%x-%A_%a.out' if array else 'slurm-%x-%j.out')
  d.append(f'--output={output}')
  d.append('--open-mode=append')  # A requeued job continues its log.
  d.append(f'--chdir={o.chdir or os.getcwd()}')
  if array:
    d.append(f'--array={array}')
  if o.requeue:
    d.append('--requeue')
  if o.signal_grace_s:
    d.append(f'--signal=TERM@{o.signal_grace_s}')
  lines = [f'#SBATCH {x}' for x in d]
  for extra in o.sbatch_lines:
    check_single_line('--sbatch_line', extra)
    extra = extra.strip()
    lines.append(extra if extra.startswith('#SBATCH') else f'#SBATCH {extra}')
  return lines


def _srun(o: SlurmOptions) -> list[str]:
  return ['srun', f'--nodes={o.nodes}', f'--ntasks={o.num_tasks}',
          f'--ntasks-per-node={o.tasks_per_node}', '--label', '--kill-on-bad-exit=0',
          f'--wait={o.wait_s}']


_HEADER = '''#!/bin/bash
# Generated by launch.slurm ({what}). Submit with: sbatch THIS_FILE
'''

_RUN_AND_REQUEUE = '''
echo "launch.slurm: job ${{SLURM_JOB_ID:-}} on ${{SLURM_JOB_NODELIST:-}}, restart ${{SLURM_RESTART_COUNT:-0}}, $(date)"
{command}
rc=$?
echo "launch.slurm: exit code $rc"
if [ "$rc" -eq {preempted} ]; then
  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then
    echo "launch.slurm: preempted after a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "launch.slurm: preempted, but requeued {max_requeues} times already: giving up"
  fi
fi
exit "$rc"
'''


def _body(o: SlurmOptions, what: str, array: str | None, prelude: list[str],
          command: str) -> str:
  lines = [_HEADER.format(what=what).rstrip('\n')]
  lines += _directives(o, array)
  lines.append('')
  env = {'PYTHONUNBUFFERED': '1', **o.env}
  if o.gpus_per_node:  # XLA/NCCL flags and memory fraction (research/gpu_env.py).
    env.update(gpu_env.gpu_env(o.env))
  if o.port:
    env['JAX_COORDINATOR_PORT'] = str(o.port)
  lines += export_lines(env)
  for s in o.setup:
    check_single_line('--setup', s)
    lines.append(s)
  lines += prelude
  text = '\n'.join(lines) + '\n'
  return text + _RUN_AND_REQUEUE.format(command=command, preempted=EXIT_PREEMPTED,
                                        max_requeues=o.max_requeues)


def job_script(o: SlurmOptions, args: Sequence[str]) -> str:
  """An sbatch script that runs ``python -m module args...`` in every task."""
  argv = program(o.python, o.module, args)
  return _body(o, 'single job', None, [], shlex.join(_srun(o) + argv))


def read_commands(sweep_dir: str) -> list[str]:
  path = os.path.join(sweep_dir, 'commands.txt')
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise LaunchError(f'{path} not found: write it with launch.sweep first.') from None
  for i, line in enumerate(lines):
    if not line.strip():
      raise LaunchError(f'{path}: line {i + 1} is empty (one command per line).')
    try:
      shlex.split(line)
    except ValueError as e:
      raise LaunchError(f'{path}: line {i + 1} is not a valid shell command: {e}') from None
  if not lines:
    raise LaunchError(f'{path} is empty.')
  return lines


def array_script(o: SlurmOptions, sweep_dir: str) -> tuple[str, int]:
  """An array job over ``sweep_dir/commands.txt``; returns (script, number of tasks)."""
  lines = read_commands(sweep_dir)
  n = len(lines)
  array = f'0-{n - 1}' + (f'%{o.max_parallel}' if o.max_parallel else '')
  commands = os.path.abspath(os.path.join(sweep_dir, 'commands.txt'))
  check_single_line('--sweep_dir', commands)
  if not o.output:
    o = dataclasses.replace(
        o, output=os.path.join(os.path.abspath(sweep_dir), 'slurm-%x-%A_%a.out'))
  prelude = [
      f'COMMANDS={shlex.quote(commands)}',
      '# Array task i runs line i+1 (the file holds shell-quoted commands).',
      'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$COMMANDS")',
      'if [ -z "$CMD" ]; then echo "launch.slurm: no line $((SLURM_ARRAY_TASK_ID + 1)) in '
      '$COMMANDS" >&2; exit 1; fi',
      'echo "launch.slurm: array task $SLURM_ARRAY_TASK_ID runs: $CMD"',
  ]
  command = shlex.join(_srun(o) + ['bash', '-c']) + ' "$CMD"'
  return _body(o, f'array of {n} sweep commands', array, prelude, command), n
