"""quantize -> dequantize arithmetic of qwix, for tests and analysis."""

from __future__ import annotations

import jax
import ml_collections
from qwix._src.core import dot_general_qt as _dot_general_qt
from qwix._src.core import qarray as _qarray

from research.config import QUANT_BITS
from research.quant.rules import QatProvider, make_rules


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
  how = _qarray.HowToQuantize(qtype=QUANT_BITS[bits], channelwise_axes=channel,
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
