r"""Post-training quantization, integer export, and the quantization ablation.

One run (PTQ, or export of a finished float/QAT run):

  python -m launch.quantize --config=experiments/qat/ablation.py --workdir=DIR \
      --config.quant.mode=ptq --config.quant.weight_bits=4 --config.quant.init_from=FLOAT_RUN

quantizes the latest checkpoint of --workdir (a finished training run: export in place)
or, when --workdir has none, of quant.init_from; writes DIR/export/ (integer weights +
scales, Orbax), evaluates the model restored from those integers with the trainer's
eval code and writes DIR/quant_summary.json (loss, perplexity, model bytes).

The ablation (one command does everything; finished runs are skipped on a rerun):

  python -m launch.quantize --ablation --config=experiments/qat/ablation.py --workdir=DIR

runs the config's sweep() (float pretraining first, then QAT and PTQ runs, each
``python -m launch.train``), exports every trained run to integers, and writes
DIR/results.md (the sweep table) and DIR/quant_results.md (the ablation table).
Exit codes: 0 done; 1 error (one line first on stderr).
"""

import os
import sys

from absl import app, flags, logging

from research import config_files, runtime

_CONFIG = config_files.DEFINE_config_file('config')  # A path or a short name (tiny).
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (or sweep directory).')
_ABLATION = flags.DEFINE_boolean('ablation', False, "Run the config's sweep() and tabulate.")
_PARALLEL = flags.DEFINE_integer('parallel', 1, '--ablation: training runs at once.')
_ONLY = flags.DEFINE_multi_string('only', [], '--ablation: select runs (as launch.sweep).')


def _config_arg(argv) -> str:
  """The --config=FILE[:arg] text as given (the sweep passes it on to each run)."""
  for a in argv:
    if a.startswith('--config='):
      return a.split('=', 1)[1]
  raise runtime.UserError('--config=FILE[:arg] is required.')


def main(argv):
  if not _WORKDIR.value:
    raise runtime.UserError('--workdir is required.')
  if _ABLATION.value:
    from research.quant import ablation as quant_ablation
    text = quant_ablation.run_ablation(
        _config_arg(sys.argv), _WORKDIR.value, parallel=_PARALLEL.value, only=_ONLY.value)
    print(text)
    return
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from research import recipe
  from research.quant import ptq
  result = recipe.quantize(_CONFIG.value, _WORKDIR.value)
  logging.info('wrote %s', os.path.join(_WORKDIR.value, ptq.SUMMARY))
  print(f'{result["setting"]}: eval loss {result["eval_loss"]:.4f} '
        f'(float {result["float_eval"]["loss"]:.4f}), model {result["model_bytes"]["total"]:,} '
        f'bytes; {_WORKDIR.value}/{ptq.SUMMARY}')


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
