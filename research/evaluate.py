"""Evaluation over a fixed part of the eval split, independent of the batch size.

How much is read is set by two keys (research/config.py):

* ``eval_tokens = 0`` (default): the first ``eval_steps`` batches of the unshuffled eval
  split (what earlier runs reported; depends on ``batch_size`` and ``eval_steps``).
* ``eval_tokens = -1``: the whole eval split.
* ``eval_tokens = N > 0``: the first N target tokens of the eval split (``eval_steps``
  is then ignored). On the file/store path the pipeline cuts the stream at exactly N
  targets (``max_tokens``), so the evaluated tokens are the same for any batch size and
  process count; on per-process streams (tfds) and example tasks each process masks
  out everything past its share of N, in its row order.

Either way the last batch is padded with mask-0 rows, every process runs the same number
of eval steps (a process whose stream ended feeds all-padding batches while another
still has data), and the result carries ``num_tokens``: the real target tokens it
averages over (for classification, the non-pad input tokens of the counted examples).
``eval_steps = 0`` disables evaluation, as before.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import ml_collections
import numpy as np


def _device_batch(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _global_sum(x: float, process_count: int) -> float:
  if process_count == 1:
    return float(x)
  from jax.experimental import multihost_utils
  return float(np.sum(multihost_utils.process_allgather(np.asarray(x, np.float64))))


def _accepts(fn: Any, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _row_tokens(batch: dict[str, np.ndarray], pad_id: int) -> np.ndarray:
  """Real target tokens per row ([B] or [B, L] mask) as a [B, L]-or-[B] array."""
  mask = np.asarray(batch['mask'], np.float64)
  if mask.ndim >= 2:
    return mask
  inputs = np.asarray(batch['inputs'])
  return (inputs != pad_id).reshape(len(inputs), -1).sum(1) * mask


def _truncate(batch: dict[str, np.ndarray], budget_left: float, pad_id: int
              ) -> tuple[dict[str, np.ndarray], float]:
  """Masks out what lies past ``budget_left`` tokens (row order); returns tokens kept."""
  counts = _row_tokens(batch, pad_id)
  flat = counts.reshape(-1)
  keep = np.cumsum(flat) <= budget_left
  mask = np.asarray(batch['mask'])
  new_mask = (mask.reshape(-1) * keep).reshape(mask.shape).astype(mask.dtype)
  return {**batch, 'mask': new_mask}, float((flat * keep).sum())


def _zeros_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.zeros_like(v) for k, v in batch.items()}


def _any(flag: bool, process_count: int) -> bool:
  return _global_sum(float(flag), process_count) > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for an ``eval_tokens`` that cannot work (call before compiling)."""
  from research.config import ConfigError
  v = config.eval_tokens
  if isinstance(v, bool) or not isinstance(v, int) or v < -1:
    raise ConfigError(f'eval_tokens={v!r} must be an integer: 0 (the first eval_steps '
                      f'batches), -1 (the whole eval split) or N > 0 (the first N tokens).')


def evaluate(config: ml_collections.ConfigDict, task: Any, tokenizer: Any, eval_fn: Any,
             train_state: Any, batch_sharding: Any, process_index: int,
             process_count: int) -> dict[str, float]:
  """Task metrics (``task.finalize_eval``) plus ``num_tokens`` over the configured eval part.

  ``eval_fn(state, batch)`` is the jitted eval step returning per-batch sums and
  ``weight``; ``train_state.state`` is what it takes. Returns {} when nothing was read.
  """
  budget = int(config.eval_tokens)
  kwargs: dict[str, Any] = dict(
      batch_size_per_process=config.batch_size // process_count, process_index=process_index,
      process_count=process_count, shuffle=False, repeat=False)
  exact = (budget > 0 and config.data.source != 'tfds'
           and _accepts(task.make_iterator, 'max_tokens'))
  if exact:
    kwargs['max_tokens'] = budget
  local_budget = None
  if budget > 0 and not exact:
    local_budget = float(budget // process_count + (process_index < budget % process_count))
  max_batches = config.eval_steps if budget == 0 else None
  pad_id = getattr(tokenizer, 'pad_id', 0)

  it = task.make_iterator(config, tokenizer, 'eval', **kwargs)
  sums, template, steps, local_tokens = None, None, 0, 0.0
  while max_batches is None or steps < max_batches:
    if local_budget is not None and not _any(local_tokens < local_budget, process_count):
      break
    batch = next(it, None)
    if process_count > 1:  # Same number of steps everywhere (the eval step is collective).
      if not _any(batch is not None, process_count):
        break
      if batch is None:
        batch = _zeros_like(template)
    elif batch is None:
      break
    template = batch if template is None else template
    if local_budget is not None:
      batch, kept = _truncate(batch, local_budget - local_tokens, pad_id)
    else:
      kept = float(_row_tokens(batch, pad_id).sum())
    local_tokens += kept
    out = jax.device_get(eval_fn(train_state.state, _device_batch(batch, batch_sharding)))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    steps += 1
  if sums is None or float(sums['weight']) == 0:
    return {}
  metrics = dict(task.finalize_eval(sums))
  metrics['num_tokens'] = int(round(_global_sum(local_tokens, process_count)))
  return metrics


def evaluate_model(config: ml_collections.ConfigDict, task: Any, tokenizer: Any, model: Any,
                   mesh: jax.sharding.Mesh) -> dict[str, float]:
  """:func:`evaluate` of a model object (a loaded run, a quantized copy) with the
  trainer's own eval step: same batches, objective and metrics as in training."""
  from flax import nnx
  from research import sharding as shd
  from research import step as step_lib
  graphdef, state = nnx.split((model, None))
  sharding = step_lib.batch_sharding(mesh, config)
  eval_fn = step_lib.make_eval_step(task, graphdef, None, sharding)
  holder = type('StateHolder', (), {'state': state})
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    return evaluate(config, task, tokenizer, eval_fn, holder, sharding,
                    jax.process_index(), jax.process_count())
