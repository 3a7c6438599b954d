"""Bytes of a (possibly integer) model, with sub-byte integers bit-packed."""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np
from flax import nnx


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
