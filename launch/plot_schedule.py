r"""Plots a config's learning-rate schedule (and batch-size ramp) to a PNG.

  python -m launch.plot_schedule --config=experiments/pretrain/schedules.py[:arg] \
      [--config.KEY=VALUE ...] [--compare=cosine,wsd,...] [--out=schedule.png]

The values are the trainer's own (research.optim.run_schedule: the Optax schedule at
count = step - 1, times the batch ramp's LR factor). ``--compare`` overlays other
``optimizer.schedule`` values with everything else equal. With a batch ramp a second
panel shows the global batch per step. Prints the LR at a few steps.
Exit codes: 0 written; 1 error (one line on stderr).
"""

import os
import sys

from absl import app, flags

from research import config_files, runtime

_CONFIG = config_files.DEFINE_config_file('config')  # A path or a short name (tiny).
_OUT = flags.DEFINE_string('out', 'schedule.png', 'PNG file to write.')
_COMPARE = flags.DEFINE_list('compare', [], 'Schedules to overlay (optimizer.schedule '
                             'values); default: only the config\'s own.')


def write_plot(config, out: str, compare=()) -> dict:
  """Draws LR vs step for the config (and ``compare`` schedules); returns the curves."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from research.batch_ramp import validate
  from research.optim import run_schedule, validate_optimizer_config

  names = list(compare) or [config.optimizer.schedule]
  curves = {}
  for name in names:
    c = config.copy_and_resolve_references()
    c.optimizer.schedule = name
    validate_optimizer_config(c.optimizer)
    curves[name] = run_schedule(c)
  ramp = validate(config)
  fig = Figure(figsize=(7.0, 6.0 if ramp.active else 4.2), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(2 if ramp.active else 1, 1, sharex=True, squeeze=False)[:, 0]
  for name, cur in curves.items():
    axes[0].plot(cur['step'], cur['learning_rate'], label=name)
  o = config.optimizer
  axes[0].set_ylabel('learning rate')
  axes[0].set_title(f'{config.name}: peak {o.learning_rate:g}, warmup {o.warmup_steps}, '
                    f'{config.steps} steps')
  axes[0].legend(loc='best', fontsize='small')
  axes[0].grid(alpha=0.3)
  if ramp.active:
    cur = next(iter(curves.values()))
    axes[1].step(cur['step'], cur['batch_size'], where='post')
    axes[1].set_ylabel('global batch (sequences)')
    axes[1].set_title(f'batch ramp: {ramp.describe()}', fontsize='small')
    axes[1].grid(alpha=0.3)
  axes[-1].set_xlabel('step')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, format='png')
  return curves


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required.')
  curves = write_plot(config, _OUT.value, _COMPARE.value)
  n = config.steps
  marks = sorted({1, max(1, config.optimizer.warmup_steps), n // 2, int(n * 0.8), n})
  for name, cur in curves.items():
    vals = ', '.join(f'{s}: {cur["learning_rate"][s - 1]:.3g}' for s in marks)
    print(f'{name}: lr at step {vals}')
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
