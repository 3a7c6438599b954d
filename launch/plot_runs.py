r"""Plots any set of run directories side by side (ours: any --workdir with metrics.jsonl).

  python -m launch.plot_runs RUN_DIR [RUN_DIR ...] --out=DIR [--metric=loss] [--split=eval]

Writes DIR/<split>_<metric>.png (one curve per run; x = tokens seen when the runs'
batch sizes differ, else steps) and DIR/final_<split>_<metric>.png (the last logged
value of each run as bars), labelled by the config keys that differ between the runs
(read from each run's config.json), and prints one line per run. Runs of a sweep work
too: ``python -m launch.plot_runs /tmp/s/000-* /tmp/s/003-* --out=/tmp/cmp``.
Exit codes: 0 written; 1 error (one line on stderr).
"""

import os
import sys

from absl import flags

from research import runtime
from research.runtime import UserError

_OUT = flags.DEFINE_string('out', None, 'Directory for the PNGs (created).')
_METRIC = flags.DEFINE_string('metric', 'loss', 'Metric of the metrics.jsonl rows '
                              '(loss, accuracy, learning_rate, tokens_per_sec, ...).')
_SPLIT = flags.DEFINE_string('split', 'eval', 'Rows of this split: eval or train.')


class PlotRunsError(UserError):
  """Bad arguments or run directories without the metric; the message says which."""


def main(argv):
  from research import plots, run_logs
  run_dirs = list(argv[1:])
  if not run_dirs:
    raise PlotRunsError('give at least one run directory: python -m launch.plot_runs '
                        'RUN_DIR [RUN_DIR ...] --out=DIR.')
  if not _OUT.value:
    raise PlotRunsError('--out=DIR is required.')
  for d in run_dirs:
    if not os.path.isfile(os.path.join(d, run_logs.METRICS)):
      raise PlotRunsError(f'{d} has no {run_logs.METRICS}; pass run directories '
                          '(a launch.train --workdir).')
  series = plots.run_series(run_dirs, _METRIC.value, _SPLIT.value)
  missing = [s.name for s in series if not s.curve]
  if len(missing) == len(series):
    raise PlotRunsError(f'no {_SPLIT.value} row with {_METRIC.value!r} in any run; check '
                        '--metric and --split.')
  os.makedirs(_OUT.value, exist_ok=True)
  figs = plots.run_figures(series, _METRIC.value, _SPLIT.value)
  for name, fig in figs.items():
    plots.save(fig, os.path.join(_OUT.value, name))
  enc = plots.encode(series, plots.RUN_LABEL_KEYS)
  for s, d in zip(series, run_dirs):
    last = (f'last {_SPLIT.value} {_METRIC.value} {s.final:.4f} at step {s.curve[-1][0]}'
            if s.curve else f'no {_SPLIT.value} {_METRIC.value} rows')
    label = enc.label[s.group].replace('\n', ' ')
    print(f'{d}: {label}: {last}')
  if enc.by_name:
    print(f'{len(enc.keys)} config keys differ between the runs: {", ".join(enc.keys)}')
  if not figs:
    print('nothing to plot: every run has a single point; no PNG written.')
  for name in figs:
    print(f'wrote {os.path.join(_OUT.value, name)}')


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
