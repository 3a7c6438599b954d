"""Process-level setup shared by entry points: logging, error reporting, exit codes."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

class UserError(Exception):
  """An error the user can fix; entry points print its one-line message and exit 1."""


EXIT_OK = 0
EXIT_ERROR = 1
# After a clean save on SIGTERM/SIGINT (preemption). 75 is EX_TEMPFAIL in sysexits.h:
# "temporary failure, retry"; the cluster launchers requeue on it.
EXIT_PREEMPTED = 75


def setup() -> None:
  """Quiet third-party noise before jax is imported."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import logging
  from absl import logging as absl_logging

  class _DropLibraryInfo(logging.Filter):
    """Orbax and grain log every save step at INFO; keep their warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
      noisy = any(s in record.pathname for s in ('/orbax/', '/grain/', '/jax/_src/'))
      return record.levelno >= logging.WARNING or not noisy

  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def one_line(message: str) -> str:
  return ' '.join(str(message).split())


def run_main(main: Callable) -> int:
  """Runs an absl main; user errors print one line on stderr and exit 1."""
  from absl import app
  from research.preemption import Preempted

  def wrapped(argv):
    try:
      main(argv)
    except UserError as e:
      print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
      sys.exit(EXIT_ERROR)
    except Preempted as e:
      print(one_line(e), file=sys.stderr, flush=True)
      sys.exit(EXIT_PREEMPTED)

  try:
    app.run(wrapped, flags_parser=_parse_flags)
  except SystemExit as e:
    return int(e.code or 0) if not isinstance(e.code, str) else EXIT_ERROR
  return EXIT_OK


def _parse_flags(argv):
  """absl flag parsing whose errors (e.g. an unknown --config.key) are one line."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
  except (KeyError, AttributeError) as e:
    # ml_collections raises these for an unknown --config.KEY; name the flag.
    text = str(e)
    key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text)
    key = key.group(1) if key else '?'
    hint = re.search(r'Did you mean "([^"]+)"', text)
    hint = f' did you mean {hint.group(1)!r}?' if hint else ''
    bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a]
    where = bad[0] if bad else 'a --config.* override'
    print(f'error: {where}: unknown config key {key!r};{hint} the keys are declared '
          f'in research/config.py.', file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)
