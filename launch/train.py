r"""Trains a model from an experiment config.

  python -m launch.train --config=experiments/pretrain/tiny.py[:arg] --workdir=DIR \
      [--config.KEY=VALUE ...]

Rerunning with the same --workdir resumes from its latest checkpoint. One job at a
time per workdir (research/workdir_lock.py); every attempt appends its full log and
any traceback to WORKDIR/train.log.
Exit codes: 0 done; 1 error (the last line on stderr is ``error: ...``); 75 preempted.
"""

import sys

from absl import app, flags

from research import config_files, distributed, runtime  # distributed: --coordinator_address etc.

_CONFIG = config_files.DEFINE_config_file('config')  # A path or a short name (tiny).
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory; reuse it to resume.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  if not workdir:
    raise runtime.UserError('--workdir is required; pass --workdir=DIR (a writable directory).')
  from research.validation import check_workdir
  check_workdir(workdir)  # Writable, before the log file and the lock go into it.
  if distributed.initialize_from_flags() is None:  # Multi-process jobs only; before JAX.
    from research import backend_defaults
    backend_defaults.set_cpu_devices(_CONFIG.value)  # One process: a CPU device per core.
  import jax
  from research import workdir_lock
  index = jax.process_index()
  runtime.log_to_file(workdir, 'train.log' if index == 0 else f'train.process{index}.log')
  from research import recipe  # After flag parsing: keeps --help fast.
  with workdir_lock.hold_for_job(workdir):  # Re-entrant: recipe.run may hold it too.
    recipe.run(_CONFIG.value, workdir)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
