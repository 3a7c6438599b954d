r"""Trains a model from an experiment config.

  python -m launch.train --config=experiments/pretrain/tiny.py[:arg] --workdir=DIR \
      [--config.KEY=VALUE ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
Exit codes: 0 done; 1 error (one-line message first on stderr).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from research import distributed, runtime  # distributed: --coordinator_address etc.

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory; reuse it to resume.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.initialize_from_flags()  # Multi-process jobs only; before any JAX work.
  from research.train import train  # After flag parsing: keeps --help fast.
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
