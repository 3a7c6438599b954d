"""QAT as a recipe wrapper: the task's model with fake-quantized matmuls (any task).

qwix intercepts the matmuls of the modules matching ``quant.targets`` inside the
task's model, whatever the task (LM, SFT, classification: a classifier's new head is
not a target). Parameters keep the float layout, so checkpoints, LoRA and restores are
unchanged.

Mixture-of-experts layers (research/models/moe.py) run their experts with grouped
matmuls that the layer keeps away from qwix (see its docstring: qwix's ragged_dot QAT
shares scales across experts and ignores groups/per-tensor/asymmetric settings).
:class:`ExpertQuantizer` fake-quantizes each expert's kernels with qwix's arithmetic
and the same ``quant`` settings (per expert and output channel, per expert for
'tensor', groups along the contraction axis), with a straight-through gradient, for
the expert weights whose path (``blocks/moe/wi_0``...) fullmatches ``quant.targets``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import ml_collections
import qwix
from flax import nnx

from research.models import moe
from research.quant.numerics import fake_quant
from research.quant.rules import QatProvider, check_model, example_tokens, make_rules
from research.tasks import Task

NAME = 'qat'


@dataclasses.dataclass(frozen=True)
class ExpertQuantizer:
  """Fake quantization of MoE expert kernels ``[E, in, out]`` (and their inputs)."""
  names: tuple[str, ...]  # Which kernels: 'wi_0', 'wi_1', 'wi', 'wo'.
  bits: int
  act_bits: int
  granularity: str
  group_size: int
  symmetric: bool
  clip_ratio: float

  def weight(self, w: jax.Array, name: str, contraction_axis: int = 1) -> jax.Array:
    if name not in self.names:
      return w
    axes = tuple(range(1, w.ndim)) if self.granularity == 'tensor' else (contraction_axis,)
    q = fake_quant(w, self.bits, axis=axes, symmetric=self.symmetric,
                   clip_ratio=self.clip_ratio,
                   group_size=self.group_size if self.granularity == 'group' else 0)
    return w + jax.lax.stop_gradient(q - w)  # Straight-through estimator.

  def activation(self, x: jax.Array) -> jax.Array:
    """Per-row absmax (each token's input to an expert matmul), straight-through."""
    q = fake_quant(x, self.act_bits, axis=-1)
    return x + jax.lax.stop_gradient(q - x)


def expert_quantizer(model: nnx.Module, q: ml_collections.ConfigDict) -> int:
  """Sets an :class:`ExpertQuantizer` on the MoE layers; returns how many got one."""
  n = 0
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, moe.MoE):
      continue
    prefix = '/'.join(map(str, path))
    names = tuple(k for k in ('wi_0', 'wi_1', 'wi', 'wo')
                  if re.fullmatch(q.targets, f'{prefix}/{k}'))
    if names:
      module.quantizer = ExpertQuantizer(
          names, q.weight_bits, q.act_bits, q.granularity, q.group_size, q.symmetric,
          float(q.clip_ratio))
      n += 1
  return n


def quantize_for_training(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """``model`` with its target matmuls fake-quantized (``quant.mode='qat'``)."""
  provider = QatProvider(make_rules(config.quant))
  model = qwix.quantize_model(model, provider, example_tokens(config))
  expert_quantizer(model, config.quant)
  return model


def _build(build, config: ml_collections.ConfigDict) -> nnx.Module:
  return quantize_for_training(build(), config)


def wrap(task: Task, config: ml_collections.ConfigDict, ctx) -> Task:
  del ctx
  check_model(config)  # quant.group_size must divide every contraction axis.
  return task.wrapped(NAME, build_model=functools.partial(_build, task.build_model, config))
