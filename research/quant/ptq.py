"""PTQ and integer export: a trained float (or QAT) run's weights as integers + scales.

:func:`run` quantizes round-to-nearest with the run's ``quant.*`` rules, writes the
integer model with Orbax under ``WORKDIR/export/``, restores it and evaluates it from
the integers with the trainer's own eval step and eval loop; the float and fake-quant
models are evaluated the same way for comparison. The weights come from ``workdir``'s
own latest checkpoint (a finished float or QAT run: export in place) or, when it has
none, from ``quant.init_from`` (PTQ into a new directory, which then gets the
trainer's output files so sweeps collect it).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import qwix
from absl import logging
from flax import nnx

from research import backend_defaults
from research import checkpoint as ckpt_lib
from research import metrics as metrics_lib
from research import runs
from research import sharding as shd
from research.config import ConfigError
from research.data import tokenizers
from research.evaluate import evaluate_model
from research.models import projection
from research.quant.model_bytes import model_bytes
from research.quant.qat import quantize_for_training
from research.quant.qat_init import check_source
from research.quant.rules import check_model, describe, example_tokens, ptq_provider
from research.tasks import make_task
from research.train_state import resolve_vocab

EXPORT_DIR = 'export'
SUMMARY = 'quant_summary.json'


def quantize_to_integers(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """A copy of float ``model`` whose target kernels are integer qvalues + scales."""
  if config.quant.mode == 'none':
    return model
  check_model(config)
  projection.use_autodiff(model)  # qwix cannot intercept inside the custom VJP.
  return qwix.quantize_model(model, ptq_provider(config.quant), example_tokens(config))


def _abstract_int_model(config, task, mesh, rules):
  """graphdef + sharded ShapeDtypeStructs of the integer model (nothing allocated)."""
  with shd.use_mesh(mesh, rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: quantize_to_integers(task.build_model(), config)))
    shardings = shd.state_shardings(abstract, mesh, rules)
  return graphdef, ckpt_lib.abstract_with_shardings(abstract, shardings)


def _with_mode(config, mode: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.quant.mode = mode
  return c


def _flat(state):
  for path, v in nnx.to_flat_state(state):
    x = v.get_value() if isinstance(v, nnx.Variable) else v
    yield '/'.join(str(k) for k in path), x


def _source(config, workdir: str) -> tuple[str, bool]:
  """(run directory whose weights are quantized, whether it is ``workdir`` itself)."""
  if runs.has_checkpoint(workdir):
    return os.path.abspath(workdir), True
  if not config.quant.init_from:
    raise ConfigError(f'{workdir} has no checkpoint to quantize; set quant.init_from=DIR '
                      '(a finished float run) or pass a trained run as --workdir.')
  run_dir = runs.resolve(config.quant.init_from, workdir)
  if not runs.has_checkpoint(run_dir):
    raise ConfigError(f'quant.init_from={config.quant.init_from!r} ({run_dir}) has no '
                      'checkpoint; train the float model there first.')
  return run_dir, False


def run(config: ml_collections.ConfigDict, workdir: str, load_run_model) -> dict[str, Any]:
  """Quantize a checkpoint to integers, export it, and evaluate it from the integers.

  ``load_run_model(run_dir, mesh=...)`` -> (model, config, step) builds a run's model as
  the run built it (research.recipe.load_run_model). Writes ``workdir/export/``,
  ``workdir/quant_summary.json`` and, for a PTQ directory, the trainer's ``config.json``,
  ``metrics.jsonl`` eval row and ``summary.json``.
  """
  t0 = time.time()
  config = ml_collections.ConfigDict(config.to_dict())
  run_dir, trained_here = _source(config, workdir)
  mesh = shd.mesh_from_config(config.mesh)
  rules = shd.rules_from_config(config.mesh)
  tokenizer = tokenizers.make_tokenizer(config.data, run_dir)
  resolve_vocab(config, tokenizer.vocab_size)
  check_source(run_dir, config)
  float_cfg = _with_mode(config, 'none')
  float_cfg.quant.init_from = ''

  with shd.use_mesh(mesh, rules):
    float_model, source_cfg, step = load_run_model(run_dir, mesh=mesh)
    # The integer model below is built from this task, the fake-quant one from the run's
    # model: both get the source's resolved execution keys (e.g. the CPU backend
    # defaults' scan_unroll), so they are the same program up to quantization.
    for key in backend_defaults.MODEL_EXECUTION_KEYS:
      float_cfg.model[key] = source_cfg.model[key]
    task = make_task(float_cfg)  # Float structure; quantization is applied below.
    # A source trained with transpose_input projections (CPU backend defaults): the
    # fake-quant model needs the plain ops too, or qwix's interception would run inside
    # the custom VJP (as quantize_to_integers does for the integer model).
    projection.use_autodiff(float_model)
    result: dict[str, Any] = {'source': run_dir, 'source_step': step,
                              'setting': describe(config.quant), 'mode': config.quant.mode}
    result['float_eval'] = evaluate_model(config, task, tokenizer, float_model, mesh)
    if config.quant.mode != 'none':
      qat_model = quantize_for_training(float_model, config)
      result['fakequant_eval'] = evaluate_model(config, task, tokenizer, qat_model, mesh)
      del qat_model
    int_model = quantize_to_integers(float_model, config)
    int_state = nnx.state(int_model)
  export_dir = os.path.join(os.path.abspath(workdir), EXPORT_DIR)
  ckpt = ckpt_lib.Checkpointer(export_dir, max_to_keep=1, async_save=False)
  ckpt.save(step, int_state, {'step': step, 'quant': config.quant.to_dict(),
                              'setting': describe(config.quant), 'source': run_dir},
            force=True, replace=True)  # A rerun recomputes the export in place.
  ckpt.wait()
  del int_model, int_state
  # Evaluate from what was written: restore the integers into the abstract int model.
  graphdef, abstract = _abstract_int_model(config, task, mesh, rules)
  restored, _ = ckpt.restore(step, abstract)
  ckpt.close()
  with shd.use_mesh(mesh, rules):
    loaded = nnx.merge(graphdef, restored)
    result['int_eval'] = evaluate_model(config, task, tokenizer, loaded, mesh)
  result['int_dtypes'] = sorted({str(x.dtype) for p, x in _flat(restored)
                                 if p.endswith('qvalue') or p.endswith('zero_point')})
  result['model_bytes'] = model_bytes(restored, config.quant)
  result['float_model_bytes'] = model_bytes(nnx.state(float_model, nnx.Param))['total']
  result['eval_loss'] = result['int_eval'].get('loss')
  result['perplexity'] = math.exp(result['eval_loss']) if result['eval_loss'] is not None else None
  result['wall_time_s'] = time.time() - t0
  is_main = jax.process_index() == 0
  if is_main:
    runs.write_json(os.path.join(workdir, SUMMARY), result)
  if not trained_here:  # A PTQ directory: the trainer's output contract, for sweeps.
    writer = metrics_lib.MetricsWriter(workdir, resume_step=0, enabled=is_main)
    writer.write({'step': step, 'split': 'eval', **result['int_eval']})
    writer.close()
    if is_main:
      runs.write_json(os.path.join(workdir, runs.CONFIG), runs.run_metadata(
          config, mesh, {'total': result['model_bytes']['total']}, {}))
      runs.write_json(os.path.join(workdir, runs.SUMMARY), {
          'steps': 0, 'tokens_seen': 0, 'final_train_loss': None,
          'final_eval_loss': result['eval_loss'], 'wall_time_s': result['wall_time_s'],
          'model_bytes': result['model_bytes']['total'], 'source': run_dir})
  logging.info('%s: eval loss %.4f (float %.4f), %s bytes', result['setting'],
               result['eval_loss'], result['float_eval'].get('loss', float('nan')),
               f'{result["model_bytes"]["total"]:,}')
  return result
