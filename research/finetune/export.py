r"""Export a fine-tuned run's model, with LoRA adapters merged into the base weights.

  python -m research.finetune.export --workdir=RUN --out=DIR [--step=-1]

Restores RUN's checkpoint (any of its steps), folds every adapter into its kernel
(research/models/lora.py ``merge_lora``) and writes DIR as a run of its own: the
model parameters in ``DIR/checkpoints/<step>/`` (no optimizer state), ``config.json``
with ``finetune.mode='full'`` (the merged model has the plain architecture), the
tokenizer if it is a SentencePiece model, and ``summary.json``. DIR is a valid
``finetune.init_from`` for further fine-tuning or evaluation, and
``research.recipe.load_run_model(DIR)`` rebuilds the merged model for inference. The
source run is only read; ``--out`` must be a new or empty directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
from absl import app, flags, logging
from flax import nnx

from research import runs


def write_run(out: str, workdir: str, config, step: int, model: nnx.Module,
              summary: dict[str, Any]) -> None:
  """Writes ``model`` as a run directory that ``research.recipe.load_run_model`` and
  ``finetune.init_from`` read: ``checkpoints/`` (model parameters only), the source's
  ``tokenizer/`` (a SentencePiece model), ``config.json`` and ``summary.json``."""
  from research import checkpoint as ckpt_lib
  out, workdir = os.path.abspath(out), os.path.abspath(workdir)
  if out == workdir:
    raise runs.RunError(f'--out={out} is the source run; export to a new directory (the '
                        f'source is never written).')
  if os.path.isdir(out) and os.listdir(out):
    raise runs.RunError(f'--out={out} exists and is not empty; choose a new directory.')
  os.makedirs(out, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(os.path.join(out, 'checkpoints'), async_save=False)
  ckpt.save(step, nnx.state((model,)), {'step': step, 'tokens_seen': 0,
                                         'exported_from': os.path.abspath(workdir)})
  ckpt.close()
  spm = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(spm):
    shutil.copytree(spm, os.path.join(out, 'tokenizer'), dirs_exist_ok=True)
  if jax.process_index() == 0:
    runs.write_json(os.path.join(out, runs.CONFIG),
                    {'config': config.to_dict(), 'exported_from': workdir})
    runs.write_json(os.path.join(out, runs.SUMMARY), summary)


def export(workdir: str, out: str, step: int = -1) -> dict[str, Any]:
  """Writes the merged model of ``workdir`` to ``out``; returns a small summary."""
  from research import recipe
  from research.models import lora
  model, config, step = recipe.load_run_model(workdir, step)
  adapters = len(lora.lora_modules(model))
  lora.merge_lora(model)
  config.finetune.mode = 'full'
  summary = {'exported_from': os.path.abspath(workdir), 'step': step,
             'merged_lora_modules': adapters}
  write_run(out, workdir, config, step, model, summary)
  logging.info('exported %s step %d to %s (%d LoRA modules merged)', workdir, step, out,
               adapters)
  return summary


def export_cli(export_fn, what: str) -> None:
  """``--workdir RUN --out DIR [--step N]`` -> ``export_fn(workdir, out, step)``; prints
  its summary as JSON. Flags are defined here, so importing a module defines none."""
  workdir = flags.DEFINE_string('workdir', None, f'The {what} to export.')
  out = flags.DEFINE_string('out', None, 'Output directory.')
  step = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: latest).')

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value or not out.value:
      print('error: --workdir and --out are required.', file=sys.stderr)
      sys.exit(1)
    print(json.dumps(export_fn(workdir.value, out.value, step.value)))

  app.run(_main)


if __name__ == '__main__':
  export_cli(export, 'fine-tuning run')
