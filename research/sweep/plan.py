"""Planning a sweep: the config's ``sweep()`` entries -> named runs and their commands.

A run's directory name is short and stable: the entry's index, a 6-hex-digit hash of
its exact overrides, and the seed when seeds are swept (``003-a1b2c3``,
``003-a1b2c3-seed1``). The index keeps ``ls`` in sweep order; the hash means an entry
edited in place gets a new directory instead of resuming the old setting's checkpoint.
``sweep.json`` maps every name to its overrides (and ``label``, the readable
``key=value,...`` form the tables and ``--only`` use). Runs already planned in
``DIR/sweep.json`` keep their names when ``sweep()`` changes around them (entries
inserted, or names of an older naming scheme), so a rerun resumes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import shlex
import sys
from typing import Any, Mapping, Sequence

import ml_collections

from research.config import ConfigError, override
from research.config_files import guarded, load_config_module

TRAIN_MODULE = 'launch.train'
PLAN = 'sweep.json'
COMMANDS = 'commands.txt'


class SweepError(ValueError):
  """The sweep cannot be planned or collected; the message names the cause (one line)."""


@dataclasses.dataclass(frozen=True)
class Run:
  index: int
  name: str  # Directory name under DIR: '003-a1b2c3' ('-seedN' with seeds).
  setting: str  # The name without the seed: runs of one setting share it.
  overrides: dict[str, Any]  # Dotted key -> value, including 'seed' when seeds are swept.
  seed: int | None
  workdir: str
  command: list[str]
  label: str = ''  # 'model.d_model=64,optimizer.learning_rate=0.001' (without the seed).

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
  config: str  # 'path[:arg]' as given to launch.train.
  extra_args: list[str]
  seeds: list[int] | None
  keys: list[str]  # The varied keys, in order of first appearance (without 'seed').
  runs: list[Run]

  def to_json(self) -> dict[str, Any]:
    return {'config': self.config, 'extra_args': self.extra_args, 'seeds': self.seeds,
            'keys': self.keys, 'runs': [r.to_json() for r in self.runs]}


# ---------------------------------------------------------------------------------
# Names and command lines.


def format_value(value: Any) -> str:
  """A value as ``--config.KEY=VALUE`` text: strings as is, everything else repr."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


def canonical(overrides: Mapping[str, Any]) -> str:
  """The exact overrides as text (key order kept): equal text, equal run."""
  return json.dumps([[str(k), format_value(v)] for k, v in overrides.items()])


def label(overrides: Mapping[str, Any]) -> str:
  """``model.d_model=64,optimizer.learning_rate=0.001``; ``base`` for ``{}``."""
  return ','.join(f'{k}={format_value(v)}' for k, v in overrides.items()) or 'base'


def run_name(index: int, overrides: Mapping[str, Any], seed: int | None = None,
             width: int = 3) -> str:
  """``003-a1b2c3`` (entry index, hash of the overrides without the seed) [``-seedN``]."""
  digest = hashlib.sha1(canonical(overrides).encode()).hexdigest()[:6]
  name = f'{index:0{width}d}-{digest}'
  return name if seed is None else f'{name}-seed{seed}'


def train_command(python: str, config: str, workdir: str, overrides: Mapping[str, Any],
                  extra_args: Sequence[str]) -> list[str]:
  """``python -m launch.train --config=... --workdir=... --config.k=v ... extra...``."""
  argv = [python, '-m', TRAIN_MODULE, f'--config={config}', f'--workdir={workdir}']
  argv += [f'--config.{k}={format_value(v)}' for k, v in overrides.items()]
  argv += list(extra_args)
  for arg in argv:
    if '\n' in arg or '\r' in arg:
      raise SweepError(f'argument {arg!r} contains a newline; commands.txt holds one '
                       'command per line.')
  return argv


# ---------------------------------------------------------------------------------
# The config's sweep() and its checks.


def parse_seeds(text: str) -> list[int] | None:
  """``''`` -> None (no seed sweep); ``'3'`` -> [0, 1, 2]; ``'0,5,7'`` -> [0, 5, 7]."""
  text = text.strip()
  if not text:
    return None
  try:
    if ',' not in text:
      n = int(text)
      if n < 1:
        raise SweepError(f'--seeds={text}: a count must be at least 1.')
      return list(range(n))
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise SweepError(f'--seeds={text!r}: expected a count N or a list like 0,1,2.') from None
  if len(set(seeds)) != len(seeds) or not seeds:
    raise SweepError(f'--seeds={text!r}: seeds must be distinct and at least one.')
  return seeds


def sweep_entries(module: Any, arg: str | None) -> list[dict[str, Any]]:
  """Calls ``sweep()`` (or ``sweep(arg)`` when it takes an argument) and checks it."""
  takes_arg = bool(inspect.signature(module.sweep).parameters)
  entries = guarded(module.__file__, 'sweep()',
                    lambda: module.sweep(arg) if takes_arg else module.sweep())
  if not isinstance(entries, (list, tuple)) or not entries:
    raise SweepError('sweep() must return a non-empty list of dicts of dotted-key overrides.')
  out = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, Mapping) or not all(isinstance(k, str) for k in entry):
      raise SweepError(f'sweep() entry {i} is {entry!r}; expected a dict such as '
                       "{'model.d_model': 64}.")
    for k, v in entry.items():
      if isinstance(v, (Mapping, ml_collections.ConfigDict)):
        raise SweepError(f'sweep() entry {i}: {k!r} is a dict; use dotted keys instead.')
    out.append(dict(entry))
  return out


def check_overrides(config: ml_collections.ConfigDict, entries: Sequence[Mapping[str, Any]]
                    ) -> None:
  """Fails before any run starts on an unknown key or a value of the wrong type."""
  for i, entry in enumerate(entries):
    try:
      override(config.copy_and_resolve_references(), dict(entry))
    except ConfigError as e:
      raise SweepError(f'sweep() entry {i}: {e}') from None
    except (TypeError, ValueError) as e:
      raise SweepError(f'sweep() entry {i} {entry!r}: {" ".join(str(e).split())}') from None


def extra_keys(config: ml_collections.ConfigDict, extra_args: Sequence[str]) -> list[str]:
  """The dotted keys of ``--config.KEY=VALUE`` extra args; each must exist in the config."""
  keys = []
  for arg in extra_args:
    m = re.fullmatch(r'--config\.([A-Za-z0-9_.]+)=(.*)', arg, flags=re.S)
    if not m:
      raise SweepError(f'{arg!r} after --: only --config.KEY=VALUE overrides are allowed.')
    key = m.group(1)
    node: Any = config
    for part in key.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise SweepError(f'{arg!r}: config key {key!r} is unknown (see research/config.py).')
      node = node[part]
    keys.append(key)
  return keys


# ---------------------------------------------------------------------------------
# The plan.


def _planned_names(sweep_dir: str) -> dict[tuple[str, int | None], tuple[str, str]]:
  """(label, seed) -> (name, setting) of the runs an existing DIR/sweep.json planned."""
  path = os.path.join(sweep_dir, PLAN)
  if not os.path.isfile(path):
    return {}
  try:
    plan = read_plan(sweep_dir)
  except (SweepError, KeyError, TypeError):
    return {}
  return {(r.label, r.seed): (r.name, r.setting) for r in plan.runs}


def make_plan(config: str, sweep_dir: str, *, seeds: list[int] | None = None,
              extra_args: Sequence[str] = (), python: str = sys.executable) -> Plan:
  """Loads the config's sweep, validates it and names every run.

  A string override equal to another entry's label (``quant.init_from='name=float'``:
  start from the run of ``{'name': 'float'}``, its directory name under the former
  naming) becomes that run's directory name (the same seed's, with seeds).
  """
  try:
    module, arg = load_config_module(config, require=('get_config', 'sweep'))
  except ConfigError as e:
    raise SweepError(str(e)) from None
  entries = sweep_entries(module, arg)
  base = guarded(module.__file__, 'get_config()',
                 lambda: module.get_config(arg) if arg is not None else module.get_config())
  check_overrides(base, entries)
  keys = list(dict.fromkeys(k for e in entries for k in e))
  fixed = extra_keys(base, extra_args)
  clash = sorted(set(fixed) & (set(keys) | ({'seed'} if seeds else set())))
  if clash:
    raise SweepError(f'--config.{clash[0]} after -- is also set by the sweep'
                     f'{" (--seeds)" if clash[0] == "seed" else ""}; drop one of them.')
  if seeds and 'seed' in keys:
    raise SweepError("sweep() sets 'seed' and --seeds is given; use one of them.")
  seen: dict[str, int] = {}
  for i, entry in enumerate(entries):
    if canonical(entry) in seen:
      raise SweepError(f'sweep() entries {seen[canonical(entry)]} and {i} are the same '
                       f'settings ({label(entry)}); remove the duplicate.')
    seen[canonical(entry)] = i
  sweep_dir = os.path.abspath(sweep_dir)
  planned = _planned_names(sweep_dir)
  width = max(3, len(str(len(entries) - 1)))
  labels = [label(e) for e in entries]
  named: dict[tuple[str, int | None], tuple[str, str]] = {}
  for i, entry in enumerate(entries):
    for seed in (seeds or [None]):
      named[labels[i], seed] = planned.get(
          (labels[i], seed), (run_name(i, entry, seed, width), run_name(i, entry, width=width)))
  runs: list[Run] = []
  for i, entry in enumerate(entries):
    for seed in (seeds or [None]):
      ov = {k: named[v, seed][0] if isinstance(v, str) and v != labels[i]
            and labels.count(v) == 1 else v for k, v in entry.items()}
      if seed is not None:
        ov['seed'] = seed
      name, setting = named[labels[i], seed]
      workdir = os.path.join(sweep_dir, name)
      runs.append(Run(index=len(runs), name=name, setting=setting, overrides=ov,
                      seed=seed, workdir=workdir,
                      command=train_command(python, config, workdir, ov, extra_args),
                      label=labels[i]))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):  # Only reachable through a hand-edited sweep.json.
    dup = next(n for n in names if names.count(n) > 1)
    raise SweepError(f'two runs would share directory {dup!r}; remove {PLAN} from the '
                     'sweep directory or use a new one.')
  return Plan(config=config, extra_args=list(extra_args), seeds=seeds, keys=keys, runs=runs)


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file: readers never see half a file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_plan(plan: Plan, sweep_dir: str) -> None:
  """Writes DIR/sweep.json and DIR/commands.txt (line i+1 = run i, shell-quoted)."""
  os.makedirs(sweep_dir, exist_ok=True)
  write_atomic(os.path.join(sweep_dir, PLAN),
              json.dumps(plan.to_json(), indent=2, default=format_value) + '\n')
  write_atomic(os.path.join(sweep_dir, COMMANDS),
              ''.join(shlex.join(r.command) + '\n' for r in plan.runs))


def read_plan(sweep_dir: str) -> Plan:
  path = os.path.join(sweep_dir, PLAN)
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise SweepError(f'{path} not found: run launch.sweep with --config first '
                     '(--dry_run writes the plan without running).') from None
  except json.JSONDecodeError as e:
    raise SweepError(f'{path} is not valid JSON: {e}') from None
  runs = []
  for r in d['runs']:
    r = dict(r)
    if not r.get('label'):  # Plans written before labels: derive it.
      r['label'] = label({k: v for k, v in r['overrides'].items() if k != 'seed'}
                         if r.get('seed') is not None else r['overrides'])
    runs.append(Run(**r))
  return Plan(config=d['config'], extra_args=d['extra_args'], seeds=d['seeds'],
              keys=d['keys'], runs=runs)


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
  """``--only``: each item is an index list/range (``0,2`` or ``1-3``), or a substring
  of a run's name or of its label (``d_model=64`` matches ``model.d_model=64,...``)."""
  if not only:
    return list(runs)
  chosen: set[int] = set()
  for item in only:
    item = item.strip()
    if re.fullmatch(r'[0-9,\s-]+', item) and re.search(r'[0-9]', item):
      for part in filter(None, (p.strip() for p in item.split(','))):
        lo, _, hi = part.partition('-')
        try:
          lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
          raise SweepError(f'--only={item!r}: {part!r} is not an index or a range a-b.') from None
        if not 0 <= lo_i <= hi_i < len(runs):
          raise SweepError(f'--only={item!r}: indices go from 0 to {len(runs) - 1}.')
        chosen.update(range(lo_i, hi_i + 1))
    else:
      hits = [r.index for r in runs if item in r.name or item in seeded_label(r)]
      if not hits:
        raise SweepError(f'--only={item!r} matches no run name or setting; settings: '
                         f'{"; ".join(dict.fromkeys(r.label for r in runs))}.')
      chosen.update(hits)
  return [r for r in runs if r.index in chosen]


def seeded_label(run: Run) -> str:
  return run.label if run.seed is None else f'{run.label},seed={run.seed}'
