"""QAT as a recipe wrapper: the task's model with fake-quantized matmuls (any task).

qwix intercepts the matmuls of the modules matching ``quant.targets`` inside the
task's model, whatever the task (LM, SFT, classification: a classifier's new head is
not a target). Parameters keep the float layout, so checkpoints, LoRA and restores are
unchanged.
"""

from __future__ import annotations

import functools

import ml_collections
import qwix
from flax import nnx

from research.quant.rules import QatProvider, check_model, example_tokens, make_rules
from research.tasks import Task

NAME = 'qat'


def quantize_for_training(model: nnx.Module, config: ml_collections.ConfigDict) -> nnx.Module:
  """``model`` with its target matmuls fake-quantized (``quant.mode='qat'``)."""
  provider = QatProvider(make_rules(config.quant))
  return qwix.quantize_model(model, provider, example_tokens(config))


def _build(build, config: ml_collections.ConfigDict) -> nnx.Module:
  return quantize_for_training(build(), config)


def wrap(task: Task, config: ml_collections.ConfigDict, ctx) -> Task:
  del ctx
  check_model(config)  # quant.group_size must divide every contraction axis.
  return task.wrapped(NAME, build_model=functools.partial(_build, task.build_model, config))
