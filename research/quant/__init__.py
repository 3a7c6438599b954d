"""Quantization: QAT, PTQ and integer export, built on Google's qwix.

One rule set (``quant.*``, :func:`make_rules`) drives three uses of the same model:

* **QAT** (``quant.mode='qat'``): ``Task.build_model`` returns
  ``qwix.quantize_model(model, QatProvider(rules), tokens)``. qwix intercepts
  ``jax.lax.dot_general`` / ``jax.numpy.einsum`` inside the modules whose path matches
  ``quant.targets`` (our ``nnx.Linear`` MLP and ``nnx.Einsum`` attention projections,
  also under ``nnx.scan``) and runs them on quantized operands; the backward pass is a
  straight-through estimator (gradient passed unchanged, zeroed outside the clipping
  range when ``clip_ratio < 1``). Parameters stay float: a QAT checkpoint has the
  float checkpoint's layout, so QAT fine-tuning starts from a float run
  (``quant.init_from``) and the shared trainer, checkpoints and eval are reused.
* **PTQ** (``quant.mode='ptq'``, ``python -m launch.quantize``): a float checkpoint is
  quantized round-to-nearest with the same rules, without training.
* **Export** (:func:`run`): the weights become integers plus scales
  (``qwix.PtqProvider``: each target kernel is replaced by ``qvalue`` int8/int4 arrays
  with float ``scale`` (and ``zero_point``)), saved with Orbax under
  ``WORKDIR/export/``, restored and evaluated with the trainer's eval code. With int8
  weights and int8 activations the matmul is a real ``s8 x s8 -> s32`` dot_general;
  weight-only settings dequantize the weights into the float matmul.

Settings: ``weight_bits`` 8/4/2; ``act_bits`` 0 (weights only) / 8 / 4 (dynamic,
per-token abs-max); ``granularity`` per-``channel`` (one scale per output feature),
per-``tensor`` (one scale per weight and per activation), or per-``group``
(``group_size`` consecutive elements of the contraction axis share a scale); symmetric
(abs-max) or asymmetric (min/max with a zero point; 8 and 4 bits) weights.

Two fixes on top of qwix 0.1.8 (small subclasses/shims below, using qwix internals
pinned by requirements.txt):
* qwix's QAT einsum goes through ``jnp.einsum``, whose ``dot_general`` lists the
  attention output kernel's (``NHD``) contraction axes as (H, N): a per-group tile then
  lands on the heads axis (and fails unless group_size divides num_heads), unlike
  qwix's own PTQ, which tiles head_dim. :class:`QatProvider` routes QAT einsums through
  qwix's einsum and orders the contraction pairs so the weight's last contracting axis
  is tiled, so QAT and the integer export share one layout and give identical logits.
* ``qwix.PtqProvider`` ignores ``disable_channelwise_axes``; per-tensor PTQ uses a
  qarray shim that drops the channel axes, as QAT does.
Not supported by qwix: asymmetric int2 (a ConfigError), asymmetric activations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix
from absl import logging
from flax import nnx
from qwix._src.core import dot_general_qt as _dot_general_qt
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.core import qarray as _qarray
from qwix._src.utils import flax_util as _flax_util

from research.config import ConfigError, base_config, validate_quant_config
from research.models import projection

BITS_TO_QTYPE = {8: 'int8', 4: 'int4', 2: 'int2'}
EXPORT_DIR = 'export'
SUMMARY = 'quant_summary.json'


# --------------------------------------------------------------------------- rules


def make_rules(q: ml_collections.ConfigDict) -> list[qwix.QtRule]:
  """The qwix rule set of a ``quant`` config section (one rule: the target regex)."""
  validate_quant_config(q)
  method = 'absmax' if q.symmetric else 'minmax'
  if q.clip_ratio != 1.0:
    method += f',{float(q.clip_ratio)}'
  return [qwix.QtRule(
      module_path=q.targets,
      op_names=('dot_general', 'einsum'),
      weight_qtype=BITS_TO_QTYPE[q.weight_bits],
      act_qtype=BITS_TO_QTYPE[q.act_bits] if q.act_bits else None,
      tile_size=q.group_size if q.granularity == 'group' else None,
      disable_channelwise_axes=q.granularity == 'tensor',
      weight_calibration_method=method,
      act_calibration_method='absmax',
  )]


def describe(q: ml_collections.ConfigDict) -> str:
  """``'W4A16 per-group(32) sym'``-style label of a setting."""
  if q.mode == 'none':
    return 'float32'
  gran = {'channel': 'per-channel', 'tensor': 'per-tensor',
          'group': f'per-group({q.group_size})'}[q.granularity]
  a = q.act_bits or 16
  return f'W{q.weight_bits}A{a} {gran} {"sym" if q.symmetric else "asym"}'


class QatProvider(qwix.QtProvider):
  """qwix's QAT provider with einsums laid out as in qwix's PTQ (see module doc)."""

  def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
             _dot_general=jax.lax.dot_general, out_sharding=None):
    rule, op_id = self._get_current_rule_and_op_id('einsum')
    if rule is None or rule.weight_qtype is None or len(operands) != 2:
      return jnp.einsum(einsum_str, *operands, precision=precision,
                        preferred_element_type=preferred_element_type,
                        _dot_general=_dot_general, out_sharding=out_sharding)

    def qt_dot_general(lhs, rhs, dimension_numbers, **unused):
      del unused
      config = self._create_dot_general_qt_config(rule, op_id, lhs, rhs)
      if rule.tile_size:
        dimension_numbers = _tile_last_weight_axis(lhs, dimension_numbers)
      return _dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, config)

    return _qwix_einsum.einsum(einsum_str, *operands, _qwix_dot_general=qt_dot_general,
                               preferred_element_type=preferred_element_type)


def _tile_last_weight_axis(lhs, dimension_numbers):
  """Reorders contraction pairs so the weight's last contracting axis is tiled.

  qwix tiles ``contracting_axes[-1]``; qwix's PTQ einsum tiles the weight's last
  contracting axis in subscript order (head_dim of ``NHD``). Permuting the pairs
  changes nothing else.
  """
  (lhs_ca, rhs_ca), batch = dimension_numbers
  w_ca = lhs_ca if _flax_util.find_param(lhs) is not None else rhs_ca
  if len(w_ca) < 2:
    return dimension_numbers
  order = sorted(range(len(w_ca)), key=lambda i: w_ca[i])
  return ((tuple(lhs_ca[i] for i in order), tuple(rhs_ca[i] for i in order)), batch)


def _per_tensor_qarray() -> Any:
  """qwix's qarray module with channel axes dropped from every quantization."""
  shim = types.SimpleNamespace(**{k: getattr(_qarray, k) for k in dir(_qarray)
                                  if not k.startswith('__')})

  def quantize(array, how):
    return _qarray.quantize(array, dataclasses.replace(how, channelwise_axes=[]))

  shim.quantize = quantize
  return shim


def ptq_provider(q: ml_collections.ConfigDict) -> qwix.PtqProvider:
  """The provider that turns target kernels into integers + scales."""
  rules = make_rules(q)
  if q.granularity == 'tensor':
    return qwix.PtqProvider(rules, _qarray_module=_per_tensor_qarray())
  return qwix.PtqProvider(rules)


def example_tokens(config: ml_collections.ConfigDict) -> jax.Array:
  """Model input qwix runs once to find the ops (values and length do not matter).

  The global batch size, so the batch divides the data shards of any valid mesh.
  """
  return jnp.zeros((config.batch_size, min(8, config.seq_len)), jnp.int32)


def check_model(config: ml_collections.ConfigDict) -> None:
  """Fails (one line) when ``quant.group_size`` does not divide a contraction axis."""
  q = config.quant
  if q.mode == 'none' or q.granularity != 'group':
    return
  from research.models.transformer import resolved_dims
  dims = resolved_dims(config.model)
  for key, size in (('model.d_model', config.model.d_model),
                    ('head_dim', dims['head_dim']), ('mlp_dim', dims['mlp_dim'])):
    if size % q.group_size:
      raise ConfigError(
          f'quant.group_size={q.group_size} does not divide {key}={size} (a contraction '
          f'axis of a quantized projection); use a divisor of {size}.')


def quantize_for_training(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """``model`` itself, or with ``quant.mode='qat'`` its fake-quantized (QAT) version."""
  q = config.get('quant')
  if q is None or q.mode != 'qat':
    return model
  check_model(config)
  provider = QatProvider(make_rules(config.quant))
  return qwix.quantize_model(model, provider, example_tokens(config))


def quantize_to_integers(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """A copy of float ``model`` whose target kernels are integer qvalues + scales."""
  if config.quant.mode == 'none':
    return model
  check_model(config)
  projection.use_autodiff(model)  # qwix cannot intercept inside the custom VJP.
  return qwix.quantize_model(model, ptq_provider(config.quant), example_tokens(config))


# --------------------------------------------------------------------------- numerics


def fake_quant(x: jax.Array, bits: int, *, axis: int | tuple[int, ...] | None = None,
               symmetric: bool = True, clip_ratio: float = 1.0, group_size: int = 0
               ) -> jax.Array:
  """quantize -> dequantize of ``x`` with qwix's arithmetic (for tests and analysis).

  ``axis``: the reduced (contraction) axes sharing a scale; None = per-tensor.
  ``group_size``: tile the last of ``axis`` into groups of this many elements.
  """
  axes = tuple(range(x.ndim)) if axis is None else (
      (axis,) if isinstance(axis, int) else tuple(axis))
  axes = tuple(a % x.ndim for a in axes)
  channel = [a for a in range(x.ndim) if a not in axes]
  method = ('absmax' if symmetric else 'minmax') + (
      f',{clip_ratio}' if clip_ratio != 1.0 else '')
  tiled = {axes[-1]: group_size} if group_size else {}
  how = _qarray.HowToQuantize(qtype=BITS_TO_QTYPE[bits], channelwise_axes=channel,
                              tiled_axes=tiled, calibration_method=method)
  return _qarray.dequantize(_qarray.quantize(x, how))


def quantized_dot(x: jax.Array, w: jax.Array, q: ml_collections.ConfigDict) -> jax.Array:
  """``x @ w`` (contract x's last axis with w's first) through the QAT op and its STE."""
  rule = QatProvider(make_rules(q))._rules[0]  # pylint: disable=protected-access
  config = _dot_general_qt.DotGeneralQtConfig(
      lhs_qtype=rule.act_qtype, rhs_qtype=rule.weight_qtype, tile_size=rule.tile_size,
      lhs_calibration_method='absmax', rhs_calibration_method=rule.weight_calibration_method,
      lhs_disable_channelwise_axes=rule.disable_channelwise_axes,
      rhs_disable_channelwise_axes=rule.disable_channelwise_axes,
      use_original_residuals=True)
  dnums = (((x.ndim - 1,), (0,)), ((), ()))
  return _dot_general_qt.dot_general_qt(x, w, dnums, config)


# --------------------------------------------------------------------------- model bytes


def _is_int_leaf(path: str, x: Any) -> bool:
  return path.endswith('qvalue') or path.endswith('zero_point')


def model_bytes(state: nnx.State, q: ml_collections.ConfigDict | None = None) -> dict[str, int]:
  """Bytes of a (possibly integer) model state, with sub-byte integers bit-packed.

  ``qvalue`` arrays count ``weight_bits`` bits per element (int2 lives in an int4
  container in memory and on disk; packed it is 2 bits); scales, zero points and float
  parameters count their dtype's size. Returns total, integer weights, scales +
  zero points, and float parameters.
  """
  bits = q.weight_bits if q is not None and q.mode != 'none' else None
  out = {'total': 0, 'int_weights': 0, 'scales': 0, 'float_params': 0}
  for path, v in nnx.to_flat_state(state):
    p = '/'.join(str(k) for k in path)
    x = v.get_value() if isinstance(v, nnx.Variable) else v
    if not hasattr(x, 'shape') or not isinstance(v, nnx.Param):
      continue
    n = int(math.prod(x.shape))
    if p.endswith('qvalue'):
      b = n * (bits or np.dtype(x.dtype).itemsize * 8) // 8
      out['int_weights'] += b
    elif p.endswith('/scale') and '/array/' in p or p.endswith('zero_point'):
      b = n * np.dtype(x.dtype).itemsize
      if p.endswith('zero_point') and bits:
        b = n * bits // 8
      out['scales'] += b
    else:
      b = n * np.dtype(x.dtype).itemsize
      out['float_params'] += b
    out['total'] += b
  return out


# --------------------------------------------------------------------------- sources


def resolve_source(path: str, workdir: str) -> str:
  """``quant.init_from`` -> an absolute run directory (relative: to workdir's parent)."""
  from research.checkpoint import resolve_run_dir
  return resolve_run_dir(path, workdir)


def _has_checkpoint(run_dir: str) -> bool:
  d = os.path.join(run_dir, 'checkpoints')
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def source_config(run_dir: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that wrote ``run_dir`` (its config.json) on today's schema, quant off.

  Keys the schema no longer has are dropped; the model section must match ``config``'s
  (shapes are what is restored).
  """
  path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'quant.init_from: {run_dir} has no config.json; point it at a '
                      'finished training run (its --workdir).')
  with open(path) as f:
    saved = json.load(f)['config']
  out = base_config()

  def merge(dst, src):
    for k, v in src.items():
      if k not in dst or k == 'mesh':  # The mesh is this run's (set below).
        continue
      if isinstance(dst[k], ml_collections.ConfigDict) and isinstance(v, dict):
        merge(dst[k], v)
        continue
      if isinstance(v, list):
        v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
      try:
        dst[k] = v
      except TypeError:  # The key changed type since that run: keep today's default.
        logging.warning('quant.init_from: ignoring %s=%r of %s', k, v, run_dir)
  merge(out, saved)
  out.quant.mode, out.quant.init_from = 'none', ''
  out.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
  if config.model.vocab_size and out.model.vocab_size != config.model.vocab_size:
    raise ConfigError(
        f'quant.init_from: {run_dir} has model.vocab_size={out.model.vocab_size} but this '
        f'run has {config.model.vocab_size}; use the same tokenizer and model.')
  for k, v in config.model.items():
    if k != 'vocab_size' and k in out.model and out.model[k] != v and k in (
        'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
        'mlp_kind', 'norm', 'positions', 'tie_embeddings', 'scan_layers', 'use_bias'):
      raise ConfigError(
          f'quant.init_from: {run_dir} has model.{k}={out.model[k]!r} but this run has '
          f'{v!r}; the quantized model must have the float model\'s shape.')
  return out


def load_float_model(run_dir: str, config: ml_collections.ConfigDict, mesh) -> tuple[nnx.Module, int]:
  """The (float-structured) model of ``run_dir``'s latest checkpoint, on ``mesh``."""
  from research import checkpoint as ckpt_lib
  from research import train as train_lib
  if not _has_checkpoint(run_dir):
    raise ConfigError(f'quant.init_from: {run_dir} has no checkpoint; train the float '
                      'model there first (or fix the path).')
  src = source_config(run_dir, config)
  abstract = train_lib.abstract_train_state(src, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(run_dir, 'checkpoints'), async_save=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore(step, abstract.state)
  ckpt.close()
  model, _ = nnx.merge(abstract.graphdef, state)
  return model, int(step)


def init_state_from(config: ml_collections.ConfigDict, workdir: str, train_state, mesh):
  """QAT fine-tuning: the train state with the float run's weights and a fresh optimizer."""
  run_dir = resolve_source(config.quant.init_from, workdir)
  float_model, step = load_float_model(run_dir, config, mesh)
  model, optimizer = nnx.merge(train_state.graphdef, train_state.state)
  nnx.update(model, nnx.state(float_model, nnx.Param))
  logging.info('Starting from the weights of %s (step %d), fresh optimizer (quant.mode=%s)',
               run_dir, step, config.quant.mode)
  return nnx.state((model, optimizer))


# --------------------------------------------------------------------------- run


def _eval(config, task, tokenizer, model: nnx.Module, batch_sharding) -> dict[str, float]:
  """The trainer's evaluation (same batches, objective and metrics) of ``model``."""
  from research import train as train_lib
  graphdef, state = nnx.split((model, None))
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, graphdef, objective=task.objective))
  holder = types.SimpleNamespace(state=state)
  return train_lib.evaluate(config, task, tokenizer, eval_fn, holder, batch_sharding,
                            jax.process_index(), jax.process_count())


def _abstract_int_model(config, task, mesh, rules):
  """graphdef + sharded ShapeDtypeStructs of the integer model (nothing allocated)."""
  from research import checkpoint as ckpt_lib
  from research import sharding as shd
  with shd.use_mesh(mesh, rules):
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: quantize_to_integers(task.build_model(), config)))
    shardings = shd.state_shardings(abstract, mesh, rules)
  return graphdef, ckpt_lib.abstract_with_shardings(abstract, shardings)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Quantize a checkpoint to integers, export it, and evaluate it from the integers.

  The weights come from ``workdir``'s own latest checkpoint (a finished float or QAT
  run: export in place) or, when it has none, from ``quant.init_from`` (PTQ into a new
  directory). Writes ``workdir/export/`` (Orbax: integer qvalues, scales and the float
  parameters), ``workdir/quant_summary.json`` and, for a PTQ directory, the trainer's
  ``summary.json`` / ``metrics.jsonl`` eval row so sweeps collect it.
  """
  from research import checkpoint as ckpt_lib
  from research import sharding as shd
  from research import train as train_lib
  from research.data import sources, tokenizers
  from research.tasks import make_task
  from research.validation import validate_config

  t0 = time.time()
  config = ml_collections.ConfigDict(config.to_dict())
  validate_config(config, workdir)
  validate_quant_config(config.quant)
  trained_here = _has_checkpoint(workdir)
  if trained_here:
    run_dir = os.path.abspath(workdir)
  elif config.quant.init_from:
    run_dir = resolve_source(config.quant.init_from, workdir)
  else:
    raise ConfigError(f'{workdir} has no checkpoint to quantize; set quant.init_from=DIR '
                      '(a finished float run) or pass a trained run as --workdir.')
  if not trained_here and not _has_checkpoint(run_dir):
    raise ConfigError(f'quant.init_from={config.quant.init_from!r} ({run_dir}) has no '
                      'checkpoint; train the float model there first.')
  mesh = shd.mesh_from_config(config.mesh)
  rules = shd.rules_from_config(config.mesh)
  sources.validate_data_config(config.data)
  tokenizer = tokenizers.make_tokenizer(config.data, run_dir)
  train_lib.resolve_vocab(config, tokenizer.vocab_size)
  float_cfg = ml_collections.ConfigDict(config.to_dict())
  float_cfg.quant.mode, float_cfg.quant.init_from = 'none', ''
  task = make_task(float_cfg)  # Float structure; quantization is applied below.
  batch_sharding = shd.named(mesh, ('batch', 'seq'), rules)

  with shd.use_mesh(mesh, rules):
    float_model, step = load_float_model(run_dir, config, mesh)
    result: dict[str, Any] = {'source': run_dir, 'source_step': step,
                              'setting': describe(config.quant), 'mode': config.quant.mode}
    result['float_eval'] = _eval(config, task, tokenizer, float_model, batch_sharding)
    if config.quant.mode != 'none':
      qat_model = quantize_for_training(float_model, _with_mode(config, 'qat'))
      result['fakequant_eval'] = _eval(config, task, tokenizer, qat_model, batch_sharding)
      del qat_model
    int_model = quantize_to_integers(float_model, config)
    int_state = nnx.state(int_model)
  export_dir = os.path.join(os.path.abspath(workdir), EXPORT_DIR)
  ckpt = ckpt_lib.Checkpointer(export_dir, max_to_keep=1, async_save=False)
  ckpt.save(step, int_state, {'step': step, 'quant': config.quant.to_dict(),
                              'setting': describe(config.quant), 'source': run_dir},
            force=True)
  ckpt.wait()
  del int_model, int_state
  # Evaluate from what was written: restore the integers into the abstract int model.
  graphdef, abstract = _abstract_int_model(config, task, mesh, rules)
  restored, _ = ckpt.restore(step, abstract)
  ckpt.close()
  with shd.use_mesh(mesh, rules):
    loaded = nnx.merge(graphdef, restored)
    result['int_eval'] = _eval(config, task, tokenizer, loaded, batch_sharding)
  result['int_dtypes'] = sorted({str(x.dtype) for p, x in _flat(restored) if _is_int_leaf(p, x)})
  result['model_bytes'] = model_bytes(restored, config.quant)
  result['float_model_bytes'] = model_bytes(nnx.state(float_model, nnx.Param))['total']
  result['eval_loss'] = result['int_eval'].get('loss')
  result['perplexity'] = math.exp(result['eval_loss']) if result['eval_loss'] is not None else None
  result['wall_time_s'] = time.time() - t0
  if jax.process_index() == 0:
    train_lib.write_json(os.path.join(workdir, SUMMARY), result)
    if not trained_here:  # A PTQ directory: the trainer's output contract for sweeps.
      with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, 'split': 'eval', **result['int_eval']}) + '\n')
      train_lib.write_json(os.path.join(workdir, 'config.json'), train_lib.run_metadata(
          config, mesh, {'total': result['model_bytes']['total']}, {}))
      train_lib.write_json(os.path.join(workdir, 'summary.json'), {
          'steps': 0, 'tokens_seen': 0, 'final_train_loss': None,
          'final_eval_loss': result['eval_loss'], 'wall_time_s': result['wall_time_s'],
          'model_bytes': result['model_bytes']['total'], 'source': run_dir})
  logging.info('%s: eval loss %.4f (float %.4f), %s bytes', result['setting'],
               result['eval_loss'], result['float_eval'].get('loss', float('nan')),
               f'{result["model_bytes"]["total"]:,}')
  return result


def _with_mode(config, mode: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.quant.mode = mode
  return c


def _flat(state):
  for path, v in nnx.to_flat_state(state):
    x = v.get_value() if isinstance(v, nnx.Variable) else v
    yield '/'.join(str(k) for k in path), x
