"""Flags of the commands that read an existing run (eval, generate): ``--run``/``--step``,
and ``--config.KEY=VALUE`` overrides typed and checked against research/config.py's
schema by absl, of which only the keys given on the command line are returned, to be
applied onto the run's config."""

from __future__ import annotations

import sys
from typing import Any

from absl import flags
from ml_collections import config_flags


def define_run_flags():
  """(``--run``, ``--step``) flag holders: which run directory, which checkpoint."""
  run = flags.DEFINE_string('run', None, 'Run directory: ours, an export, or an HF checkpoint.')
  step = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the latest).')
  return run, step


def required_run(run_flag) -> str:
  """The ``--run`` value, or a one-line UserError when it is missing."""
  if not run_flag.value:
    from research.runtime import UserError
    raise UserError('--run is required: a launch.train --workdir, an export, or an '
                    'HF checkpoint directory.')
  return run_flag.value


def define_config_overrides() -> None:
  from research.config import base_config
  config_flags.DEFINE_config_dict('config', base_config(),
                                  'Overrides of the run\'s config: --config.KEY=VALUE.')


def config_overrides(argv: list[str] | None = None) -> dict[str, Any]:
  """{dotted key: typed value} of the ``--config.KEY=VALUE`` flags given."""
  argv = sys.argv if argv is None else argv
  config = flags.FLAGS.config
  out = {}
  for a in argv[1:]:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node = config
    for part in key.split('.'):
      node = node[part]
    out[key] = node
  return out
