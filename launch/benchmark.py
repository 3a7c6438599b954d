r"""Benchmarks the train step of a config.

  python -m launch.benchmark --config=experiments/pretrain/small.py --steps=10 \
      [--out=benchmark.json] [--config.mesh.fsdp=8 ...]

Prints a JSON report (compile time, step time, tokens/s, TFLOP/s, MFU, memory) and
writes it to --out.
"""

import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from research import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Where to write the JSON report.')


def main(argv):
  from research.benchmark import run_benchmark
  report = run_benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value)
  with open(_OUT.value, 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  logging.info('step %.4fs  %.0f tok/s  %.3f TFLOP/s  MFU %.1f%% (%s)',
               report['step_time_s'], report['tokens_per_sec'],
               report['model_tflops_per_sec'], 100 * report['mfu'],
               report['peak_flops_source'])


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
