r"""The ``gcloud compute tpus tpu-vm ssh`` command that starts the trainer on every worker.

  gcloud compute tpus tpu-vm ssh NAME --zone=Z [--project=P] --worker=all \
      --command='cd ~/research && export K=V && python3 -m launch.train ... --distributed=tpu'

Each worker of a slice runs one JAX process; ``--distributed=tpu`` makes
``research/distributed.py`` call ``jax.distributed.initialize()``, which reads the
coordinator and the worker id from the TPU metadata server. The remote command is
one string that the worker's shell parses: every trainer argument is
``shlex.quote``d into it, and the local side runs ``gcloud`` as an argv list (no
local shell), so values with spaces, quotes or ``$(...)`` arrive unchanged.

Preemption: a spot/preemptible TPU VM is deleted when preempted; recreate it and
run the same command (the trainer resumes from the checkpoint in the workdir, which
must be on shared storage such as a GCS bucket or a mounted disk). With
``--retry_preempted`` the remote command reruns the trainer while it exits 75
(e.g. after a maintenance-event SIGTERM).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Sequence

from launch.cluster.common import LaunchError, check_single_line, check_token, export_lines, program
from research.runtime import EXIT_PREEMPTED


@dataclasses.dataclass
class TpuOptions:
  tpu_name: str = ''
  zone: str = ''
  project: str = ''
  worker: str = 'all'
  repo_dir: str = '~/research'  # Where this repository is checked out on the workers.
  setup: Sequence[str] = ()  # Shell lines run first on each worker (raw shell).
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  python: str = 'python3'
  module: str = 'launch.train'
  retry_preempted: bool = False
  extra_gcloud: Sequence[str] = ()  # More gcloud flags, e.g. '--internal-ip'.


def _cd(repo_dir: str) -> str:
  check_single_line('--repo_dir', repo_dir)
  if repo_dir == '~':
    return 'cd ~'
  if repo_dir.startswith('~/'):  # Keep the tilde outside the quotes so it expands.
    return 'cd ~/' + shlex.quote(repo_dir[2:])
  return 'cd ' + shlex.quote(repo_dir)


def remote_command(o: TpuOptions, args: Sequence[str]) -> str:
  """The shell command each worker runs."""
  argv = program(o.python, o.module, [*args, '--distributed=tpu'])
  parts = [_cd(o.repo_dir)]
  parts += export_lines({'PYTHONUNBUFFERED': '1', **o.env})
  for s in o.setup:
    check_single_line('--setup', s)
    parts.append(s)
  run = shlex.join(argv)
  if o.retry_preempted:
    run = (f'{{ while true; do {run}; rc=$?; [ "$rc" -eq {EXIT_PREEMPTED} ] || exit "$rc"; '
           'echo "launch.tpu: preempted (75): restarting"; done; }')
  return ' && '.join(parts + [run])


def gcloud_argv(o: TpuOptions, args: Sequence[str]) -> list[str]:
  """The local argv (run without a shell)."""
  if not o.tpu_name:
    raise LaunchError('--tpu_name is required.')
  check_token('--tpu_name', o.tpu_name)
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', o.tpu_name]
  if o.zone:
    argv.append(f'--zone={check_token("--zone", o.zone)}')
  if o.project:
    argv.append(f'--project={check_token("--project", o.project)}')
  argv.append(f'--worker={check_token("--worker", o.worker)}')
  argv += list(o.extra_gcloud)
  argv.append(f'--command={remote_command(o, args)}')
  return argv
