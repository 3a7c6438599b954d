"""Tasks plug into the shared trainer: model, forward pass, loss, data, eval metrics.

A task is what differs between pretraining and fine-tuning; the loop, sharding,
checkpointing and metrics are the trainer's. Add a task by writing a module with a
``make_task(config) -> Task`` and registering it in ``_REGISTRY``.

``make_task`` returns the *base* task only. Fine-tuning modes, QAT, distillation and
pruning are wrappers applied by the recipe layer (:mod:`research.recipe`), which
returns a new :class:`Task` with e.g. a different ``build_model`` or ``loss``; the
trainer never imports a feature package.
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


def token_weights(batch: dict[str, Any]) -> Any:
  """The per-output weights a loss averages over: the token mask [B, L]."""
  return batch['mask']


def _chain_calls(first: Callable | None, second: Callable) -> Callable:
  if first is None:
    return second

  def both(*args):
    first(*args)
    second(*args)
  return both


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer needs from a task.

  forward(model, batch, deterministic) -> outputs (logits; an LM with a chunked loss
    returns the final hidden states and lets ``loss`` apply the head chunk by chunk).
  loss(model, outputs, batch, deterministic) -> (loss, aux): aux values are means over
    the batch's weight units, ``batch['mask'].sum()`` (tokens, or examples).
  weights(batch) -> the weights ``loss`` averages over, with the shape of the outputs'
    leading axes (distillation averages its KL with them).
  make_iterator(config, tokenizer, split, *, batch_size_per_process, process_index,
    process_count, shuffle, repeat) -> a checkpointable iterator of numpy batches.
  build_model() -> the nnx.Module to train (called under the mesh, inside jit).
  finalize_eval(sums) -> metrics: turns summed eval aux into the eval row.
  decode_samples: whether to write samples.txt at the end (language models).
  trainable: the nnx filter of what the optimizer updates.
  Hooks set by wrappers: post_update(model, step) runs inside the jitted step after the
  optimizer update; initialize(ts, workdir) -> state on a fresh start; at_end(ts,
  workdir, is_main) -> dict merged into summary.json.
  features: the wrappers applied, in order (the trainer checks them against the config).
  """
  name: str
  forward: Callable
  loss: Callable
  make_iterator: Callable
  build_model: Callable[[], nnx.Module]
  weights: Callable[[dict[str, Any]], Any] = token_weights
  finalize_eval: Callable[[dict[str, Any]], dict[str, Any]] = mean_over_weight
  decode_samples: bool = False
  trainable: Any = nnx.Param
  post_update: Callable | None = None
  initialize: Callable | None = None
  at_end: Callable | None = None
  features: tuple[str, ...] = ()

  def objective(self, model, batch, deterministic: bool):
    """(loss, aux) of ``model`` on ``batch``: the loss of the forward pass."""
    return self.loss(model, self.forward(model, batch, deterministic), batch, deterministic)

  def wrapped(self, feature: str, **changes: Any) -> 'Task':
    """A copy with ``changes`` and ``feature`` appended to ``features``."""
    return dataclasses.replace(self, features=self.features + (feature,), **changes)

  def then_post_update(self, fn: Callable) -> Callable:
    """``post_update`` that runs the current hook, then ``fn``."""
    return _chain_calls(self.post_update, fn)

  def then_initialize(self, fn: Callable) -> Callable:
    """``initialize`` that runs the current hook, then ``fn`` on its resulting state."""
    first = self.initialize
    if first is None:
      return fn

    def both(ts, workdir):
      ts.state = first(ts, workdir)
      return fn(ts, workdir)
    return both

  def then_at_end(self, fn: Callable) -> Callable:
    """``at_end`` whose summary fields are the current hook's updated by ``fn``'s."""
    first = self.at_end
    if first is None:
      return fn

    def both(ts, workdir, is_main):
      return {**(first(ts, workdir, is_main) or {}), **(fn(ts, workdir, is_main) or {})}
    return both


_REGISTRY = {'lm': 'research.tasks.lm',
             'classification': 'research.tasks.classification',  # Fine-tuning tasks.
             'sft': 'research.tasks.sft'}
TASKS = tuple(_REGISTRY)


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The base task of ``config.task`` (no fine-tuning/compression wrappers)."""
  if config.task not in _REGISTRY:
    raise ConfigError(f'task={config.task!r} is unknown; use one of {sorted(_REGISTRY)}.')
  return importlib.import_module(_REGISTRY[config.task]).make_task(config)


def register(name: str, module: str) -> None:
  _REGISTRY[name] = module
