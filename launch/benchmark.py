r"""Benchmarks the train step of a config, alone or side by side with PyTorch.

  python -m launch.benchmark --config=experiments/pretrain/small.py --steps=10 \
      [--out=benchmark.json] [--config.mesh.fsdp=8 ...]

Prints a JSON report (compile time, time to first step, step time, tokens/s, CPU
seconds per step, TFLOP/s, MFU against a roofline measured in this process, memory)
and writes it to --out.

  python -m launch.benchmark --against=torch --config=experiments/pretrain/small.py \
      [--shape=4x128] [--repeats=3] [--cores=0,1 | --threads=N] [--out=side_by_side.json]

runs ours and a PyTorch reference of the same shape (GPT-2 block), interleaved, each
in a subprocess pinned to the same cores, and reports the ratios
(benchmarks/side_by_side.py; README "Benchmarking").
"""

import json
import sys
import time

_STARTED = time.time()  # Before the heavy imports: the time to first step counts them.

from absl import flags, logging  # noqa: E402

from research import config_files, runtime  # noqa: E402

_CONFIG = config_files.DEFINE_config_file('config')  # A path or a short name (tiny).
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation (the first '
                               'is the time-to-first-step step).')
_OUT = flags.DEFINE_string('out', None, 'Where to write the JSON report (default '
                           'benchmark.json, or side_by_side.json with --against).')
_AGAINST = flags.DEFINE_enum('against', '', ['', 'torch'],
                             'torch: side by side with benchmarks/torch_gpt.py.')
_REPEATS = flags.DEFINE_integer('repeats', 3, '--against: repeats of each side (A B A B).')
_THREADS = flags.DEFINE_integer('threads', 0, '--against: threads of each side (= cores '
                                'pinned; 0: all cores this process may use).')
_CORES = flags.DEFINE_string('cores', '', '--against: comma-separated cores to pin both '
                             'sides to (default: the first --threads, or all).')
_SHAPE = flags.DEFINE_string('shape', '', '--against: size preset applied over the config: '
                             "'' (the config's), 'small' (6x384, block 256) or '4x128' "
                             '(block 64, batch 12).')
_GPT2_BLOCK = flags.DEFINE_boolean('gpt2_block', True, '--against: give our model the '
                                   'GPT-2 block the PyTorch reference has.')
_KEEP = flags.DEFINE_string('keep_dir', '', '--against: where the children\'s reports and '
                            'logs go (default: a temporary directory).')
_STARTED_UNIX = flags.DEFINE_float('started_unix', None, 'Set by the side-by-side harness: '
                                   'when it started this process.')


def main(argv):
  if _AGAINST.value:
    from benchmarks import side_by_side
    config_args = [a for a in sys.argv[1:] if a.startswith('--config=')
                   or a.startswith('--config.')]
    try:
      report = side_by_side.run(
          config_args, shape=_SHAPE.value, gpt2_block=_GPT2_BLOCK.value,
          repeats=_REPEATS.value, steps=_STEPS.value, warmup=_WARMUP.value,
          threads=_THREADS.value, cores=_CORES.value,
          out=_OUT.value or 'side_by_side.json', keep_dir=_KEEP.value)
    except side_by_side.SideBySideError as e:
      raise runtime.UserError(str(e)) from None
    print(side_by_side.format_table(report))
    return
  from research import backend_defaults
  backend_defaults.set_cpu_devices(_CONFIG.value)  # As launch.train: before JAX starts.
  from research.benchmark import run_benchmark
  report = run_benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                         started_unix=_STARTED_UNIX.value or _STARTED)
  with open(_OUT.value or 'benchmark.json', 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps({k: v for k, v in report.items() if k != 'step_times_s'}, indent=2))
  logging.info('step %.4fs  %.0f tok/s  %.3f TFLOP/s  MFU %.1f%% (%s)  first step after %.1fs',
               report['step_time_s'], report['tokens_per_sec'],
               report['model_tflops_per_sec'], 100 * report['mfu'],
               report['peak_flops_source'], report['time_to_first_step_s'])


def entry() -> None:
  runtime.setup()
  sys.exit(runtime.run_main(main))


if __name__ == '__main__':
  entry()
