"""Tasks plug into the shared trainer: model, objective, data, eval metrics.

A task is what differs between pretraining and fine-tuning; the loop, sharding,
checkpointing and metrics are the trainer's. Add a task by writing a module with a
``make_task(config) -> Task`` and registering it in ``_REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from research.config import ConfigError


def mean_over_weight(sums: dict[str, Any]) -> dict[str, float]:
  """Eval sums (aux mean x weight, and 'weight') -> means; 'weight' kept as a count."""
  w = float(sums['weight'])
  out = {k: float(v) / w for k, v in sums.items() if k != 'weight' and jax.numpy.ndim(v) == 0}
  out['num_tokens'] = w
  return out


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer needs from a task.

  objective(model, batch, deterministic) -> (loss, aux): aux values are means over
    the batch's weight units, ``batch['mask'].sum()`` (tokens, or examples).
  make_iterator(config, tokenizer, split, *, batch_size_per_process, process_index,
    process_count, shuffle, repeat) -> a checkpointable iterator of numpy batches.
  build_model() -> the nnx.Module to train (called under the mesh, inside jit).
  finalize_eval(sums) -> metrics: turns summed eval aux into the eval row.
  decode_samples: whether to write samples.txt at the end (language models).
  """
  name: str
  objective: Callable
  make_iterator: Callable
  build_model: Callable[[], nnx.Module]
  finalize_eval: Callable[[dict[str, Any]], dict[str, Any]] = mean_over_weight
  decode_samples: bool = False
  trainable: Any = nnx.Param  # nnx filter of what the optimizer updates.
  # Optional hooks (research/compress): post_update(model, step) runs inside the jitted
  # step after the optimizer update; initialize(ts, workdir) -> state on a fresh start;
  # at_end(ts, workdir, is_main) -> dict merged into summary.json.
  post_update: Callable | None = None
  initialize: Callable | None = None
  at_end: Callable | None = None


_REGISTRY = {'lm': 'research.tasks.lm',
             'classification': 'research.tasks.classification',  # Fine-tuning tasks.
             'sft': 'research.tasks.sft'}


def make_task(config: ml_collections.ConfigDict) -> Task:
  if config.task not in _REGISTRY:
    raise ConfigError(f'task={config.task!r} is unknown; use one of {sorted(_REGISTRY)}.')
  task = importlib.import_module(_REGISTRY[config.task]).make_task(config)
  from research.finetune import adapt_task  # LoRA / frozen backbone (finetune.mode).
  from research.compress import adapt_task as compress_task  # distill.* / prune.*
  return compress_task(adapt_task(task, config), config)


def register(name: str, module: str) -> None:
  _REGISTRY[name] = module
