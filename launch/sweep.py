r"""Runs an experiment's sweep() (one training run per override set) and tabulates it.

  python -m launch.sweep --config=experiments/pretrain/tiny.py:smoke=True --workdir=DIR \
      [--parallel=N] [--only=NAME_PART|INDEX|A-B ...] [--seeds=N|0,1,2] \
      [--collect_only] [--dry_run] [-- --config.KEY=VALUE ...]

Each run is ``python -m launch.train --config=<same> --workdir=DIR/<name>
--config.<k>=<v> ... <args after -->`` in its own process; ``<name>`` is the entry's
index and a hash of its overrides (``003-a1b2c3``, ``-seedN`` with seeds), mapped to the
settings in DIR/sweep.json. Finished runs (summary.json)
are skipped, others rerun (the trainer resumes), failures are recorded and the sweep
goes on. Writes DIR/sweep.json, DIR/commands.txt (line i+1 = run i, for
``python -m launch.slurm --sweep_dir=DIR``), DIR/results.{md,csv} and DIR/*.png.
``--collect_only`` rebuilds the results from DIR/sweep.json (after a Slurm array job).

Exit codes: 0 every selected run finished ok (or --dry_run); 1 an error or a run not ok
(one line ``error: ...`` on stderr; the tables are still written); 75 stopped by
SIGTERM, 130 by SIGINT (running trainers saved a checkpoint; rerun to resume).
"""

import signal
import sys

from absl import app, flags

from research import sweep
from research.config import ConfigError
from research.runtime import one_line

_CONFIG = flags.DEFINE_string('config', None, 'Experiment config file[:arg] or short name '
                              '(tiny), as for launch.train.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (one subdirectory per run).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at once (subprocesses on this machine).')
_ONLY = flags.DEFINE_multi_string(
    'only', [], 'Select runs: a substring of a run name or of its settings (d_model=64), '
    'or indices/ranges such as 0,2 or 1-3 (repeatable; the union is run).')
_SEEDS = flags.DEFINE_string('seeds', '', 'Repeat every setting over seeds: a count N '
                             '(seeds 0..N-1) or a list 0,1,2. Empty: no seed sweep.')
_COLLECT_ONLY = flags.DEFINE_boolean('collect_only', False,
                                     'Only rebuild results.* and plots from DIR/sweep.json.')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Write sweep.json and commands.txt, print '
                                'the runs and their commands, run nothing.')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'Interpreter in the run commands.')
_GRACE = flags.DEFINE_float('grace_s', 120.0, 'On SIGTERM/SIGINT: seconds the running '
                            'trainers get to save before they are killed.')


def _on_sigterm(signum, frame):
  raise sweep.Interrupted(signum)


def _report(results, selected) -> int:
  names = {r.name for r in selected}
  bad = [r for r in results if r['name'] in names and r['status'] != sweep.OK]
  ok = len(names) - len(bad)
  print(f'[sweep] {ok}/{len(names)} selected runs ok; results in {_WORKDIR.value}/results.md')
  if bad:
    first = bad[0]
    detail = f': {first["error"]}' if first['error'] else ''
    print(f'error: {len(bad)} of {len(names)} runs not ok ({first["name"]} {first["status"]}'
          f'{detail}); see {_WORKDIR.value}/results.md', file=sys.stderr)
    return 1
  return 0


def main(argv) -> int:
  extra = list(argv[1:])
  if not _WORKDIR.value:
    raise sweep.SweepError('--workdir is required.')
  if _COLLECT_ONLY.value:
    if extra:
      raise sweep.SweepError('--collect_only reads DIR/sweep.json; pass no args after --.')
    plan = sweep.read_plan(_WORKDIR.value)
    if _CONFIG.value and _CONFIG.value != plan.config:
      raise sweep.SweepError(f'--config={_CONFIG.value} differs from {plan.config!r} in '
                             f'{_WORKDIR.value}/sweep.json; drop --config to collect it.')
    selected = sweep.select(plan.runs, _ONLY.value)
    return _report(sweep.collect(_WORKDIR.value, plan), selected)
  if not _CONFIG.value:
    raise sweep.SweepError('--config is required (or --collect_only with DIR/sweep.json).')
  if _PARALLEL.value < 1:
    raise sweep.SweepError(f'--parallel={_PARALLEL.value}: must be at least 1.')
  plan = sweep.make_plan(_CONFIG.value, _WORKDIR.value, seeds=sweep.parse_seeds(_SEEDS.value),
                         extra_args=extra, python=_PYTHON.value)
  selected = sweep.select(plan.runs, _ONLY.value)
  sweep.write_plan(plan, _WORKDIR.value)
  if _DRY_RUN.value:
    sys.stdout.write(sweep.describe_plan(plan, selected, _PARALLEL.value))
    print(f'wrote {_WORKDIR.value}/sweep.json and {_WORKDIR.value}/commands.txt; '
          'ran nothing (--dry_run).')
    return 0
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    sweep.execute(selected, parallel=_PARALLEL.value, grace_s=_GRACE.value)
  except sweep.Interrupted as e:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sweep.collect(_WORKDIR.value, plan)
    print(f'error: sweep {e}; running trainers saved a checkpoint: rerun the same command '
          'to resume.', file=sys.stderr)
    return 75 if e.signum == signal.SIGTERM else 130
  return _report(sweep.collect(_WORKDIR.value, plan), selected)


def _main(argv):
  try:
    sys.exit(main(argv))
  except (sweep.SweepError, ConfigError) as e:
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    hint = (' (trainer overrides go after --: launch.sweep ... -- --config.KEY=VALUE)'
            if any(a.startswith('--config.') for a in argv) else '')
    print(f'error: {one_line(e)}{hint}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(_main, flags_parser=_parse_flags)
