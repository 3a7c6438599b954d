"""Ablation sweeps: plan the runs of a config's ``sweep()``, run them, collect results.

A sweep directory ``DIR`` holds one run directory per override set, named from the
overrides (:func:`run_name`), plus the plan and the results::

  DIR/sweep.json        the plan: config, extra args, seeds, keys, and every run
                        (index, name, setting, overrides, seed, workdir, command)
  DIR/commands.txt      line i+1 = the shell-quoted command of run i (Slurm array task i)
  DIR/<run>/            the trainer's workdir (config.json, metrics.jsonl, summary.json...)
  DIR/<run>/train.log   the trainer's stdout+stderr, appended per attempt
  DIR/<run>/sweep_status.json   status, exit code and error of the last local attempt
  DIR/results.md, DIR/results.csv   one row per run (per setting with seeds)
  DIR/results_runs.csv  with seeds: one row per run
  DIR/*.png             plots (research/plots.py)

A run is finished when its ``summary.json`` exists; rerunning a sweep skips finished
runs and reruns the others (the trainer resumes from its checkpoint). Commands are
argv lists end to end; ``commands.txt`` quotes each argument with ``shlex.quote``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

from research.config import ConfigError, override

TRAIN_MODULE = 'launch.train'
SUMMARY = 'summary.json'
METRICS = 'metrics.jsonl'
STATUS = 'sweep_status.json'
LOG = 'train.log'
PLAN = 'sweep.json'
COMMANDS = 'commands.txt'
EXIT_PREEMPTED = 75  # research.runtime.EXIT_PREEMPTED (not imported: keeps this module light).

_MAX_NAME = 120
_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')
# Status values of a run, in the order a summary prefers to report them.
OK, FAILED, PREEMPTED, INTERRUPTED, INCOMPLETE, PENDING = (
    'ok', 'failed', 'preempted', 'interrupted', 'incomplete', 'pending')


class SweepError(ValueError):
  """The sweep cannot be planned or collected; the message names the cause (one line)."""


class Interrupted(Exception):
  """The sweep was stopped by a signal after its running trainers were stopped."""

  def __init__(self, signum: int):
    super().__init__(f'interrupted by {signal.Signals(signum).name}')
    self.signum = signum


@dataclasses.dataclass(frozen=True)
class Run:
  index: int
  name: str  # Directory name under DIR; includes the seed when seeds are swept.
  setting: str  # The name without the seed: runs of one setting share it.
  overrides: dict[str, Any]  # Dotted key -> value, including 'seed' when seeds are swept.
  seed: int | None
  workdir: str
  command: list[str]

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
# Naming and command lines.


def format_value(value: Any) -> str:
  """A value as ``--config.KEY=VALUE`` text: strings as is, everything else repr."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


def run_name(overrides: Mapping[str, Any]) -> str:
  """A stable, filesystem-safe name: ``model.d_model=64,optimizer.learning_rate=0.001``.

  Keys keep the order of the sweep entry. Characters outside ``[A-Za-z0-9._+-]`` in a
  key or value become ``_``; when that loses information, or the name is longer than
  120 characters, an 8-hex-digit hash of the exact overrides is appended, so distinct
  entries never share a name. ``{}`` is ``base``.
  """
  if not overrides:
    return 'base'
  parts, lossy = [], False
  for key, value in overrides.items():
    k, v = str(key), format_value(value)
    sk, sv = _UNSAFE.sub('_', k), _UNSAFE.sub('_', v)
    lossy |= (sk, sv) != (k, v)
    parts.append(f'{sk}={sv}')
  name = ','.join(parts)
  if lossy or len(name) > _MAX_NAME:
    digest = hashlib.sha1(
        json.dumps([[str(k), format_value(v)] for k, v in overrides.items()]).encode()
    ).hexdigest()[:8]
    name = f'{name[:_MAX_NAME - 9]}-{digest}'
  return name


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
# Planning.


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


def load_config_module(config: str) -> tuple[Any, str | None]:
  """Imports ``path`` of ``path[:arg]``; returns (module, arg)."""
  path, sep, arg = config.partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'--config={config}: file {path!r} not found.')
  name = '_sweep_config_' + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  _guarded(path, 'import', lambda: spec.loader.exec_module(module))
  for fn in ('get_config', 'sweep'):
    if not callable(getattr(module, fn, None)):
      raise SweepError(f'--config={config}: {path} defines no {fn}().')
  return module, (arg if sep else None)


def _guarded(path: str, what: str, fn: Callable[[], Any]) -> Any:
  """Runs config-file code; its exceptions become one-line errors naming the file."""
  try:
    return fn()
  except (SweepError, ConfigError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{path}: {what} failed: {type(e).__name__}: '
                     f'{" ".join(str(e).split())}') from e


def sweep_entries(module: Any, arg: str | None) -> list[dict[str, Any]]:
  """Calls ``sweep()`` (or ``sweep(arg)`` when it takes an argument) and checks it."""
  takes_arg = bool(inspect.signature(module.sweep).parameters)
  entries = _guarded(module.__file__, 'sweep()',
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


def make_plan(config: str, sweep_dir: str, *, seeds: list[int] | None = None,
              extra_args: Sequence[str] = (), python: str = sys.executable) -> Plan:
  """Loads the config's sweep, validates it and names every run."""
  module, arg = load_config_module(config)
  entries = sweep_entries(module, arg)
  base = _guarded(module.__file__, 'get_config()',
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
  sweep_dir = os.path.abspath(sweep_dir)
  runs: list[Run] = []
  names: dict[str, int] = {}
  for i, entry in enumerate(entries):
    setting = run_name(entry)
    for seed in (seeds or [None]):
      ov = dict(entry) if seed is None else {**entry, 'seed': seed}
      name = run_name(ov)
      if name in names:
        raise SweepError(f'sweep() entries {names[name]} and {i} give the same run '
                         f'{name!r}; remove the duplicate.')
      names[name] = i
      workdir = os.path.join(sweep_dir, name)
      runs.append(Run(index=len(runs), name=name, setting=setting, overrides=ov, seed=seed,
                      workdir=workdir,
                      command=train_command(python, config, workdir, ov, extra_args)))
  return Plan(config=config, extra_args=list(extra_args), seeds=seeds, keys=keys, runs=runs)


def write_plan(plan: Plan, sweep_dir: str) -> None:
  """Writes DIR/sweep.json and DIR/commands.txt (line i+1 = run i, shell-quoted)."""
  os.makedirs(sweep_dir, exist_ok=True)
  _write_text(os.path.join(sweep_dir, PLAN),
              json.dumps(plan.to_json(), indent=2, default=format_value) + '\n')
  _write_text(os.path.join(sweep_dir, COMMANDS),
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
  runs = [Run(**r) for r in d['runs']]
  return Plan(config=d['config'], extra_args=d['extra_args'], seeds=d['seeds'],
              keys=d['keys'], runs=runs)


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
  """``--only``: each item is an index list/range (``0,2`` or ``1-3``) or a name substring."""
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
      hits = [r.index for r in runs if item in r.name]
      if not hits:
        raise SweepError(f'--only={item!r} matches no run name; names: '
                         f'{", ".join(r.name for r in runs)}.')
      chosen.update(hits)
  return [r for r in runs if r.index in chosen]


# ---------------------------------------------------------------------------------
# Run state.


def is_finished(run: Run) -> bool:
  return os.path.isfile(os.path.join(run.workdir, SUMMARY))


def read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


def run_state(run: Run) -> tuple[str, str]:
  """(status, error) from the run directory: summary.json wins, then sweep_status.json."""
  if is_finished(run):
    return OK, ''
  st = read_json(os.path.join(run.workdir, STATUS)) or {}
  status = st.get('status', '')
  if status in (FAILED, PREEMPTED, INTERRUPTED):
    return status, st.get('error', '')
  if status == OK:  # Exit 0 but the summary is gone.
    return FAILED, f'{SUMMARY} missing'
  started = any(os.path.exists(os.path.join(run.workdir, f))
                for f in (METRICS, 'checkpoints', 'config.json'))
  return (INCOMPLETE if started else PENDING), ''


def plan_state(run: Run) -> str:
  """What running the sweep would do with this run: done, resume or new."""
  if is_finished(run):
    return 'done'
  if os.path.isdir(os.path.join(run.workdir, 'checkpoints')):
    return 'resume'
  return 'new'


def _write_text(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_status(run: Run, **fields: Any) -> None:
  fields = {'name': run.name, 'index': run.index, **fields,
            'command': shlex.join(run.command), 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
  _write_text(os.path.join(run.workdir, STATUS), json.dumps(fields, indent=2) + '\n')


def error_from_log(text: str, tail: int = 5) -> str:
  """The trainer's last ``error: ...`` line, else its last ``tail`` non-empty lines."""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  for ln in reversed(lines):
    if ln.startswith('error:'):
      return ln[len('error:'):].strip()
  return ' | '.join(lines[-tail:])[-600:]


# ---------------------------------------------------------------------------------
# Execution.


@dataclasses.dataclass
class _Active:
  run: Run
  proc: subprocess.Popen
  log: Any
  log_offset: int
  start: float


def _death_signal_hook() -> Callable[[], None] | None:
  """A preexec_fn giving the trainer SIGTERM (save, stop) if the sweep dies (Linux)."""
  if sys.platform != 'linux':
    return None
  try:
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Loaded in the parent, not the child.
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG.


def _start(run: Run, env: Mapping[str, str]) -> _Active:
  os.makedirs(run.workdir, exist_ok=True)
  log = open(os.path.join(run.workdir, LOG), 'ab')
  log.write(f'=== launch.sweep {time.strftime("%Y-%m-%d %H:%M:%S")}: '
            f'{shlex.join(run.command)}\n'.encode())
  log.flush()
  offset = log.tell()
  write_status(run, status='running', returncode=None, error='')
  proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True,
                          preexec_fn=_death_signal_hook())
  return _Active(run, proc, log, offset, time.time())


def _finish(a: _Active, returncode: int, *, interrupted: bool = False) -> dict[str, Any]:
  a.log.close()
  with open(os.path.join(a.run.workdir, LOG), 'rb') as f:
    f.seek(a.log_offset)
    text = f.read().decode(errors='replace')
  wall = round(time.time() - a.start, 1)
  if returncode == 0 and is_finished(a.run):
    status, error = OK, ''
  elif interrupted:
    status, error = INTERRUPTED, f'stopped by the sweep (exit {returncode}); rerun to resume'
  elif returncode == EXIT_PREEMPTED:
    status, error = PREEMPTED, error_from_log(text) or 'preempted; rerun to resume'
  else:
    status = FAILED
    error = (f'exit 0 but no {SUMMARY}' if returncode == 0 else
             error_from_log(text) or f'exit {returncode}')
  fields = {'status': status, 'returncode': returncode, 'error': error, 'wall_s': wall}
  write_status(a.run, **fields)
  return {'name': a.run.name, **fields}


def _stop(active: Sequence[_Active], grace_s: float) -> None:
  """SIGTERM every trainer (they save and exit 75); SIGKILL after grace_s or a 2nd ^C."""
  for a in active:
    if a.proc.poll() is None:
      try:
        os.killpg(a.proc.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.time() + grace_s
  try:
    while any(a.proc.poll() is None for a in active) and time.time() < deadline:
      time.sleep(0.2)
  except KeyboardInterrupt:
    pass
  for a in active:
    if a.proc.poll() is None:
      try:
        os.killpg(a.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      a.proc.wait()


def execute(runs: Sequence[Run], *, parallel: int = 1, env: Mapping[str, str] | None = None,
            log: Callable[[str], None] = print, grace_s: float = 120.0
            ) -> list[dict[str, Any]]:
  """Runs ``runs`` (unfinished ones only), ``parallel`` at a time; continues past failures.

  Returns one outcome per started run: {'name', 'status', 'returncode', 'error', 'wall_s'}.
  On KeyboardInterrupt or :class:`Interrupted` the running trainers get SIGTERM (they
  save a checkpoint), are recorded as interrupted, and :class:`Interrupted` is raised.
  """
  env = dict(os.environ if env is None else env)
  if parallel > 1:
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # Share one GPU's memory.
  todo = [r for r in runs if not is_finished(r)]
  for r in runs:
    if is_finished(r):
      log(f'[sweep] done already: {r.name}')
  total, outcomes, active = len(todo), [], []
  queue = list(todo)
  try:
    while queue or active:
      while queue and len(active) < max(1, parallel):
        run = queue.pop(0)
        log(f'[sweep] start {total - len(queue)}/{total}: {run.name}')
        active.append(_start(run, env))
      time.sleep(0.1)
      for a in list(active):
        rc = a.proc.poll()
        if rc is None:
          continue
        active.remove(a)
        out = _finish(a, rc)
        outcomes.append(out)
        err = f': {out["error"]}' if out['error'] else ''
        log(f'[sweep] {out["status"]} ({out["wall_s"]:.0f} s): {a.run.name}{err}')
  except (KeyboardInterrupt, Interrupted) as e:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    log(f'[sweep] {signal.Signals(signum).name}: stopping {len(active)} running trainer(s)')
    _stop(active, grace_s)
    for a in active:
      outcomes.append(_finish(a, a.proc.returncode, interrupted=True))
    raise Interrupted(signum) from None
  return outcomes


# ---------------------------------------------------------------------------------
# Collection.


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  except OSError:
    pass
  return rows


def curve(rows: Iterable[Mapping[str, Any]], split: str, key: str = 'loss'
          ) -> list[tuple[int, float]]:
  """(step, value) sorted by step; a step logged twice (resume) keeps its last value."""
  by_step: dict[int, float] = {}
  for r in rows:
    if r.get('split') == split and _is_number(r.get(key)) and _is_number(r.get('step')):
      by_step[int(r['step'])] = float(r[key])
  return sorted(by_step.items())


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


METRIC_COLUMNS = ('final_train_loss', 'final_eval_loss', 'best_eval_loss', 'tokens_seen',
                  'wall_time_s', 'steps', 'param_count')
STD_COLUMNS = ('final_train_loss', 'final_eval_loss', 'best_eval_loss', 'wall_time_s')


def run_result(run: Run) -> dict[str, Any]:
  """Status, error, final metrics and curves of one run (partial runs: from metrics.jsonl)."""
  status, error = run_state(run)
  summary = read_json(os.path.join(run.workdir, SUMMARY)) or {}
  rows = read_metrics(os.path.join(run.workdir, METRICS))
  train, evals = curve(rows, 'train'), curve(rows, 'eval')
  res: dict[str, Any] = {
      'index': run.index, 'name': run.name, 'setting': run.setting, 'seed': run.seed,
      'overrides': run.overrides, 'status': status, 'error': error,
      'train_curve': train, 'eval_curve': evals}
  res['final_train_loss'] = summary.get('final_train_loss', train[-1][1] if train else None)
  res['final_eval_loss'] = summary.get('final_eval_loss', evals[-1][1] if evals else None)
  res['best_eval_loss'] = min((v for _, v in evals), default=None)
  last_tokens = [r['tokens_seen'] for r in rows if _is_number(r.get('tokens_seen'))]
  res['tokens_seen'] = summary.get('tokens_seen', last_tokens[-1] if last_tokens else None)
  res['wall_time_s'] = summary.get('wall_time_s')
  res['steps'] = summary.get('steps', max((s for s, _ in train), default=None))
  res['param_count'] = summary.get('param_count')
  for k in METRIC_COLUMNS:
    if not _is_number(res[k]):
      res[k] = None
  return res


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting: mean and sample std (n-1) of each metric over its ok runs."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in results:
    groups.setdefault(r['setting'], []).append(r)
  rows = []
  for setting, rs in groups.items():
    ok = [r for r in rs if r['status'] == OK]
    counts: dict[str, int] = {}
    for r in rs:
      counts[r['status']] = counts.get(r['status'], 0) + 1
    status = OK if len(ok) == len(rs) else ', '.join(f'{k} {v}/{len(rs)}'
                                                       for k, v in counts.items())
    row: dict[str, Any] = {
        'name': setting, 'overrides': {k: v for k, v in rs[0]['overrides'].items()
                                       if k != 'seed'},
        'seeds': ' '.join(str(r['seed']) for r in rs), 'n_ok': len(ok), 'status': status,
        'error': '; '.join(f'seed={r["seed"]}: {r["error"]}' for r in rs if r['error'])}
    for k in METRIC_COLUMNS:
      vals = [r[k] for r in ok if r[k] is not None]
      mean = statistics.fmean(vals) if vals else None
      if k not in STD_COLUMNS and mean is not None and all(float(v).is_integer() for v in vals):
        mean = round(mean) if mean.is_integer() else mean  # Counts stay integers.
      row[k] = mean
      if k in STD_COLUMNS:
        row[f'{k}_std'] = statistics.stdev(vals) if len(vals) > 1 else None
    rows.append(row)
  return rows


def _csv_value(x: Any) -> str:
  if x is None:
    return ''
  if isinstance(x, float):
    return repr(x)
  return str(x)


def table_columns(keys: Sequence[str], seeds: bool) -> list[str]:
  """results.csv columns: name, the keys, [seeds, n_ok,] status, metrics [+ _std], error."""
  cols = ['name', *keys]
  if seeds:
    cols += ['seeds', 'n_ok']
  cols.append('status')
  for k in METRIC_COLUMNS:
    cols.append(k)
    if seeds and k in STD_COLUMNS:
      cols.append(f'{k}_std')
  cols.append('error')
  return cols


def table_rows(results: Sequence[Mapping[str, Any]], keys: Sequence[str], seeds: bool
               ) -> list[dict[str, str]]:
  rows = aggregate(results) if seeds else results
  out = []
  for r in rows:
    d = {'name': r['name']}
    for k in keys:
      d[k] = format_value(r['overrides'][k]) if k in r['overrides'] else ''
    for c in table_columns(keys, seeds):
      if c not in d:
        d[c] = _csv_value(r.get(c))
    out.append(d)
  return out


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator='\n')
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def _fmt(x: str, column: str) -> str:
  if x == '':
    return ''
  v = float(x)
  if column.endswith('loss') or column.endswith('loss_std'):
    return f'{v:.4f}'
  if column.startswith('wall_time_s'):
    return f'{v:.1f}'
  return f'{v:,.0f}'


def _md_cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def to_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, str]], keys: Sequence[str]
                ) -> str:
  """The table of results.md: metrics as ``mean ± std`` when seeds are swept."""
  heads = {'final_train_loss': 'final train loss', 'final_eval_loss': 'final eval loss',
           'best_eval_loss': 'best eval loss', 'tokens_seen': 'tokens',
           'wall_time_s': 'wall time (s)', 'param_count': 'params', 'n_ok': 'ok runs'}
  shown = [c for c in columns if not c.endswith('_std')]
  lines = ['| ' + ' | '.join(heads.get(c, c) for c in shown) + ' |',
           '|' + '|'.join('---:' if c in METRIC_COLUMNS else '---' for c in shown) + '|']
  for r in rows:
    cells = []
    for c in shown:
      if c in METRIC_COLUMNS:
        cell = _fmt(r[c], c)
        std = r.get(f'{c}_std', '')
        if cell and std:
          cell += f' ± {_fmt(std, c)}'
        cells.append(cell)
      elif c in keys:
        cells.append(f'`{r[c]}`' if r[c] else '(default)')
      else:
        cells.append(r[c])
    lines.append('| ' + ' | '.join(_md_cell(x) for x in cells) + ' |')
  return '\n'.join(lines) + '\n'


def collect(sweep_dir: str, plan: Plan | None = None, *, plots: bool = True
            ) -> list[dict[str, Any]]:
  """Writes results.csv, results.md (and results_runs.csv with seeds) and the plots.

  Returns the per-run results (status, error, metrics, curves).
  """
  plan = plan or read_plan(sweep_dir)
  results = [run_result(r) for r in plan.runs]
  seeds = bool(plan.seeds)
  cols = table_columns(plan.keys, seeds)
  rows = table_rows(results, plan.keys, seeds)
  _write_text(os.path.join(sweep_dir, 'results.csv'), to_csv(cols, rows))
  if seeds:
    run_cols = table_columns(plan.keys + ['seed'], False)
    run_rows = table_rows(results, plan.keys + ['seed'], False)
    _write_text(os.path.join(sweep_dir, 'results_runs.csv'), to_csv(run_cols, run_rows))
  images: list[str] = []
  if plots:
    from research import plots as plots_lib  # matplotlib only when plotting.
    images = plots_lib.write_plots(sweep_dir, results, plan.keys, seeds)
  counts: dict[str, int] = {}
  for r in results:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  md = [f'# Sweep results\n',
        f'Config `{plan.config}`'
        + (f' with `{shlex.join(plan.extra_args)}`' if plan.extra_args else '')
        + (f', seeds {plan.seeds} (mean ± sample std over the ok runs)' if seeds else '')
        + f'; {len(results)} runs: '
        + ', '.join(f'{v} {k}' for k, v in counts.items()) + '.\n',
        to_markdown(cols, rows, plan.keys)]
  md += [f'![{os.path.splitext(p)[0]}]({p})\n' for p in images]
  _write_text(os.path.join(sweep_dir, 'results.md'), '\n'.join(md))
  return results


def describe_plan(plan: Plan, selected: Sequence[Run], parallel: int) -> str:
  """The ``--dry_run`` listing: one line per selected run plus its command."""
  states = {r.index: plan_state(r) for r in selected}
  n_done = sum(s == 'done' for s in states.values())
  lines = [f'sweep of {plan.config}: {len(selected)} of {len(plan.runs)} runs selected, '
           f'{n_done} done, {len(selected) - n_done} to run (parallel={parallel})']
  for r in selected:
    lines.append(f'{r.index:4d}  {states[r.index]:<6}  {r.name}')
    lines.append(f'      {shlex.join(r.command)}')
  return '\n'.join(lines) + '\n'
