r"""Export a fine-tuned run's model, with LoRA adapters merged into the base weights.

  python -m research.finetune.export --workdir=RUN --out=DIR [--step=-1]

Restores RUN's checkpoint (any of its steps), folds every adapter into its kernel
(research/models/lora.py ``merge_lora``) and writes DIR as a run of its own: the
model parameters in ``DIR/checkpoints/<step>/`` (no optimizer state), ``config.json``
with ``finetune.mode='full'`` (the merged model has the plain architecture), the
tokenizer if it is a SentencePiece model, and ``summary.json``. DIR is a valid
``finetune.init_from`` for further fine-tuning or evaluation, and ``load_run_model(DIR)``
rebuilds the merged model for inference.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx



def _run_config(workdir: str) -> ml_collections.ConfigDict:
  from research.config import base_config
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)['config']
  config = base_config()
  _merge_dict(config, saved)
  return config


def _merge_dict(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  for k, v in values.items():
    if k not in config:
      continue  # A key from a newer/older schema: ignored.
    if isinstance(config[k], ml_collections.ConfigDict) and isinstance(v, dict):
      _merge_dict(config[k], v)
    else:
      config[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) \
          if isinstance(v, list) else v


def load_run_model(workdir: str, step: int = -1, variables: Any = nnx.Param):
  """(model, config, step): the model of a run (or an export) with its saved weights.

  Built as the run built it (LoRA modules included for a LoRA run; a distillation
  teacher left out: it is not part of the run's model) and filled by the partial
  restore of research/finetune/init.py. ``variables`` (a type or tuple of types) are
  the model state restored from the checkpoint, e.g. ``(nnx.Param, PruneMask)``; every
  one of them must be in it.
  """
  from research import sharding as shd
  from research.finetune import init as ft_init
  from research.tasks import make_task
  from research.train import create_train_state
  config = _run_config(workdir)
  config.finetune.init_from = ''
  config.distill.teacher, config.distill.teacher_config = '', ''
  mesh = shd.mesh_from_config(config.mesh)
  task = make_task(config)
  ts = create_train_state(config, mesh, task.build_model, wrt=task.trainable)
  wanted = [(p, v) for p, v in nnx.to_flat_state(ts.state[0]) if isinstance(v, variables)]
  view = nnx.from_flat_state([(p, nnx.Param(v.get_value())) for p, v in wanted])
  arrays, report = ft_init.restore_from_checkpoint(workdir, step, view)
  missing = sorted({'/'.join(map(str, p)) for p, _ in wanted} - set(arrays))
  if missing:
    raise ValueError(f'{workdir} step {report["step"]} lacks parameters {missing[:5]}.')
  model, _ = nnx.merge(ts.graphdef, ts.state)
  flat = [(p, v.replace(arrays['/'.join(map(str, p))]) if '/'.join(map(str, p)) in arrays
           else v) for p, v in nnx.to_flat_state(nnx.state(model))]
  nnx.update(model, nnx.from_flat_state(flat))
  return model, config, report['step']


def write_run(out: str, workdir: str, config, step: int, model: nnx.Module,
              summary: dict[str, Any]) -> None:
  """Writes ``model`` as a run directory that ``load_run_model`` and
  ``finetune.init_from`` read: ``checkpoints/`` (model parameters only), the source's
  ``tokenizer/`` (a SentencePiece model), ``config.json`` and ``summary.json``."""
  from research import checkpoint as ckpt_lib
  os.makedirs(out, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(os.path.join(out, 'checkpoints'), async_save=False)
  ckpt.save(step, nnx.state((model,)), {'step': step, 'tokens_seen': 0,
                                         'exported_from': os.path.abspath(workdir)})
  ckpt.close()
  spm = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(spm):
    shutil.copytree(spm, os.path.join(out, 'tokenizer'), dirs_exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(out, 'config.json'), 'w') as f:
      json.dump({'config': config.to_dict(), 'exported_from': os.path.abspath(workdir)}, f,
                indent=2, default=str)
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)


def export(workdir: str, out: str, step: int = -1) -> dict[str, Any]:
  """Writes the merged model of ``workdir`` to ``out``; returns a small summary."""
  from research.models import lora
  model, config, step = load_run_model(workdir, step)
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
