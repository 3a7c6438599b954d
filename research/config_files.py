"""Experiment config files: ``FILE[:ARG]`` or a shipped config's short name -> a module.

Every entry point loads ``--config`` through this module, so a config is addressable

- by file path, relative to the current directory or absolute (any ``.py`` file with a
  ``get_config(arg)``), and
- by the short name of a config shipped in the ``experiments`` package, from any
  directory once the package is installed: ``tiny``, ``pretrain/tiny``,
  ``experiments/pretrain/tiny.py`` (the README's path, also outside the repository) all
  name ``experiments/pretrain/tiny.py``. A short name that ends more than one shipped
  path is refused with one line listing the candidates.

``load_config_module`` imports the file (the sweep, the fine-tuning and quantization
ablations use it); ``DEFINE_config_file`` is ml_collections' ``--config`` flag with
the same resolution (launch.train and every other ``--config`` command).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections.config_flags import config_flags  # The module: its parser class.

from research.config import ConfigError

_SKIP_DIRS = {'__pycache__'}


class ConfigFileError(ConfigError):
  """``--config`` names no file and no shipped config, or several shipped ones."""


def experiments_dir() -> str | None:
  """The directory of the importable ``experiments`` package (installed or checkout)."""
  spec = importlib.util.find_spec('experiments')
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.abspath(list(spec.submodule_search_locations)[0])


@functools.cache
def shipped_configs(root: str) -> tuple[str, ...]:
  """Paths (relative to ``root``, no ``.py``) of the files there that define get_config."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      if not f.endswith('.py') or f == '__init__.py':
        continue
      path = os.path.join(dirpath, f)
      try:
        with open(path, encoding='utf-8') as fh:
          if 'def get_config(' not in fh.read():
            continue
      except OSError:
        continue
      found.append(os.path.relpath(path, root)[:-3].replace(os.sep, '/'))
  return tuple(found)


def resolve(config: str, root: str | None = None) -> str:
  """``FILE[:ARG]`` with FILE made an existing path: as given when it is a file, else the
  shipped config its short name denotes (absolute path). Raises ConfigFileError.

  ``root``: the directory of shipped configs (default: the ``experiments`` package's).
  """
  path, sep, arg = config.partition(':')
  if os.path.isfile(path):
    return config
  root = root or experiments_dir()
  name = path[:-3] if path.endswith('.py') else path
  name = name.replace(os.sep, '/').strip('/')
  if name.startswith('experiments/'):
    name = name[len('experiments/'):]
  shipped = shipped_configs(root) if root else ()
  hits = [s for s in shipped if s == name or s.endswith('/' + name)] if name else []
  if len(hits) == 1:
    return os.path.join(root, *hits[0].split('/')) + '.py' + sep + arg
  if len(hits) > 1:
    raise ConfigFileError(f'--config={config}: {name!r} is ambiguous; candidates: '
                          f'{", ".join(hits)} (give more of the path).')
  short = ', '.join(shipped) if shipped else 'none (the experiments package is not importable)'
  raise ConfigFileError(f'--config={config}: no file {path!r} and no shipped config of that '
                        f'name; shipped: {short}.')


def load_config_module(config: str, require: Sequence[str] = ('get_config',)
                       ) -> tuple[Any, str | None]:
  """Imports the file of ``FILE[:ARG]`` (or short name); returns (module, ARG or None).

  Each name in ``require`` must be a callable of the module; errors are one line.
  """
  resolved = resolve(config)
  path, sep, arg = resolved.partition(':')
  name = '_config_file_' + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  guarded(path, 'import', lambda: spec.loader.exec_module(module))
  for fn in require:
    if not callable(getattr(module, fn, None)):
      raise ConfigFileError(f'--config={config}: {path} defines no {fn}().')
  return module, (arg if sep else None)


def guarded(path: str, what: str, fn: Callable[[], Any]) -> Any:
  """Runs config-file code; its exceptions become one-line ConfigErrors naming the file."""
  try:
    return fn()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigFileError(f'{path}: {what} failed: {type(e).__name__}: '
                          f'{" ".join(str(e).split())}') from e


class ResolvingConfigFileParser(config_flags.ConfigFileFlagParser):
  """ml_collections' config-file flag parser, after :func:`resolve` of the path."""

  def parse(self, path):  # pylint: disable=missing-function-docstring
    if isinstance(path, str):
      try:
        path = resolve(path)
      except ConfigFileError as e:
        raise ValueError(str(e)) from None  # absl reports it as one flag error.
    return super().parse(path)


def DEFINE_config_file(name: str, default: str | None = None,  # pylint: disable=invalid-name
                       help_string: str = 'Experiment config file[:arg] or short name.',
                       **kwargs: Any) -> flags.FlagHolder:
  """``ml_collections.config_flags.DEFINE_config_file`` whose value may be a short name.

  The flag, its ``--NAME.KEY=VALUE`` overrides and its errors are ml_collections'; only
  the path is resolved first, so a bad name is one ``flag --config=...`` line.
  """
  holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  flag = kwargs.get('flag_values', flags.FLAGS)[name]
  flag.parser = ResolvingConfigFileParser(name, kwargs.get('lock_config', True))
  return holder
