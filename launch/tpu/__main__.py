r"""Runs (or with --dry_run prints) the trainer on every worker of a Cloud TPU VM slice.

  python -m launch.tpu --tpu_name=my-v5p-64 --zone=us-east5-a --project=P \
      --repo_dir='~/research' [--setup='source ~/venv/bin/activate'] [--dry_run] \
      -- --config=experiments/pretrain/small.py --workdir=gs://bucket/runs/small

See launch/tpu/command.py.
"""

import shlex
import subprocess
import sys

from absl import app, flags

from launch.cluster.common import LaunchError, parse_env, passthrough
from launch.tpu import command

_d = command.TpuOptions()
_NAME = flags.DEFINE_string('tpu_name', _d.tpu_name, 'TPU VM name.')
_ZONE = flags.DEFINE_string('zone', _d.zone, 'Zone (empty: gcloud default).')
_PROJECT = flags.DEFINE_string('project', _d.project, 'Project (empty: gcloud default).')
_WORKER = flags.DEFINE_string('worker', _d.worker, 'Workers to run on (all, or 0,1,...).')
_REPO = flags.DEFINE_string('repo_dir', _d.repo_dir, 'This repository on the workers.')
_SETUP = flags.DEFINE_multi_string('setup', [], 'Shell line run first on each worker (raw).')
_ENV = flags.DEFINE_multi_string('env', [], 'NAME=VALUE exported on each worker (repeatable).')
_PYTHON = flags.DEFINE_string('python', _d.python, 'Python interpreter on the workers.')
_MODULE = flags.DEFINE_string('module', _d.module, 'Module each worker runs.')
_RETRY = flags.DEFINE_boolean('retry_preempted', _d.retry_preempted,
                              'Rerun the trainer on a worker while it exits 75.')
_EXTRA = flags.DEFINE_multi_string('gcloud_flag', [], 'Extra gcloud flag (repeatable).')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the gcloud command; run nothing.')


def main(argv):
  try:
    opts = command.TpuOptions(
        tpu_name=_NAME.value, zone=_ZONE.value, project=_PROJECT.value, worker=_WORKER.value,
        repo_dir=_REPO.value, setup=_SETUP.value, env=parse_env(_ENV.value),
        python=_PYTHON.value, module=_MODULE.value, retry_preempted=_RETRY.value,
        extra_gcloud=_EXTRA.value)
    cmd = command.gcloud_argv(opts, passthrough(argv))
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if _DRY_RUN.value:
    print(shlex.join(cmd))
    return 0
  try:
    return subprocess.run(cmd).returncode
  except FileNotFoundError:
    print('error: gcloud not found on PATH.', file=sys.stderr)
    return 1


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
