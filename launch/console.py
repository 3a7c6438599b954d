"""Console commands of the installed package (pyproject.toml ``[project.scripts]``).

``research-train ARGS`` is exactly ``python -m launch.train ARGS``: each command runs its
module as ``__main__`` (runpy), so flags, exit codes and errors are the module's own,
and works from any directory once the package is installed.
"""

import runpy
import sys


def _run(module: str) -> None:
  sys.argv[0] = module  # absl's program name in --help and errors.
  runpy.run_module(module, run_name='__main__', alter_sys=True)


def train() -> None:
  _run('launch.train')


def sweep() -> None:
  _run('launch.sweep')


def evaluate() -> None:
  _run('launch.eval')


def generate() -> None:
  _run('launch.generate')


def plan() -> None:
  _run('launch.plan')


def benchmark() -> None:
  _run('launch.benchmark')


def plot_runs() -> None:
  _run('launch.plot_runs')
