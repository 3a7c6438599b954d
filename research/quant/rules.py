"""qwix rules of a ``quant`` config section, and the two shims over qwix internals.

Two fixes on top of qwix 0.1.8 (using qwix internals pinned by requirements.txt):
* qwix's QAT einsum goes through ``jnp.einsum``, whose ``dot_general`` lists the
  attention output kernel's (``NHD``) contraction axes as (H, N): a per-group tile then
  lands on the heads axis (and fails unless group_size divides num_heads), unlike
  qwix's own PTQ, which tiles head_dim. :class:`QatProvider` routes QAT einsums through
  qwix's einsum and orders the contraction pairs so the weight's last contracting axis
  is tiled, so QAT and the integer export share one layout and give identical logits.
* ``qwix.PtqProvider`` ignores ``disable_channelwise_axes``; per-tensor PTQ uses a
  qarray shim that drops the channel axes, as QAT does.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from qwix._src.core import dot_general_qt as _dot_general_qt
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.core import qarray as _qarray
from qwix._src.utils import flax_util as _flax_util

from research.config import QUANT_BITS, ConfigError
from research.feature_validation import validate_quant

def make_rules(q: ml_collections.ConfigDict) -> list[qwix.QtRule]:
  """The qwix rule set of a ``quant`` config section (one rule: the target regex)."""
  validate_quant(q)
  method = 'absmax' if q.symmetric else 'minmax'
  if q.clip_ratio != 1.0:
    method += f',{float(q.clip_ratio)}'
  return [qwix.QtRule(
      module_path=q.targets,
      op_names=('dot_general', 'einsum'),
      weight_qtype=QUANT_BITS[q.weight_bits],
      act_qtype=QUANT_BITS[q.act_bits] if q.act_bits else None,
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
