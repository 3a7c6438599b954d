"""Helpers shared by the cluster launchers: argv handling, quoting, env, submission.

Quoting rule of every launcher: the trainer's arguments stay an argv list from the
command line to the process that runs them. Where a shell must read them (an sbatch
script, a remote ``--command``), each one is ``shlex.quote``d, so a value such as
``--config.name='a b' $(rm -rf /)`` arrives unchanged and is never executed.
Kubernetes gets the argv as a YAML list (no shell at all). This module defines no
absl flags, so several launchers can be imported together (tests).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from typing import Iterable, Sequence

_ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


class LaunchError(ValueError):
  """A launcher option is invalid; the message names it."""


def passthrough(argv: Sequence[str]) -> list[str]:
  """The arguments after the program name (absl keeps them; a leading ``--`` is dropped)."""
  args = list(argv[1:])
  if args and args[0] == '--':
    args = args[1:]
  return args


def program(python: str, module: str, args: Sequence[str]) -> list[str]:
  """``python -m module args...`` as an argv list."""
  if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.]*', module):
    raise LaunchError(f'--module={module!r} is not a Python module name.')
  return [python, '-m', module, *args]


def parse_env(items: Iterable[str] | None) -> dict[str, str]:
  """``['K=V', ...]`` -> dict; names must be shell identifiers (values are free text)."""
  out: dict[str, str] = {}
  for item in items or ():
    key, sep, value = item.partition('=')
    if not sep or not _ENV_NAME.match(key):
      raise LaunchError(f'--env={item!r}: expected NAME=VALUE with NAME a shell identifier.')
    out[key] = value
  return out


def export_lines(env: dict[str, str]) -> list[str]:
  return [f'export {k}={shlex.quote(v)}' for k, v in env.items()]


def check_single_line(name: str, value: str) -> str:
  if '\n' in value or '\r' in value:
    raise LaunchError(f'{name}={value!r} must not contain a newline.')
  return value


def check_token(name: str, value: str) -> str:
  """For values that end up in a directive (#SBATCH) or a DNS name: no spaces/quotes."""
  if not re.fullmatch(r'[A-Za-z0-9_.,:@%+=/\-\[\]]*', value):
    raise LaunchError(f'{name}={value!r}: only letters, digits and _.,:@%+=/-[] are allowed.')
  return value


def submit(argv: list[str], stdin: str | None = None) -> int:
  """Runs ``argv`` (no shell) and relays its output; returns its exit code."""
  try:
    r = subprocess.run(argv, input=stdin, text=True)
  except FileNotFoundError:
    print(f'error: {argv[0]} not found on PATH.', file=sys.stderr)
    return 1
  return r.returncode
