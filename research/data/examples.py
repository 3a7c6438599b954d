"""Batches of fixed-length examples (fine-tuning tasks), one example per row, on grain.

Unlike the LM pipeline (research/data/pipeline.py), nothing is packed: a random-access
source of raw examples is shuffled by seed (reshuffled each epoch), encoded by a task's
function into a dict of fixed-shape numpy arrays, and batched. As in the LM pipeline,
the *global* batch is formed and process ``p`` keeps rows ``[p*B, (p+1)*B)``; a finite
pass (eval) pads its last batch with all-zero rows, whose ``mask`` is 0.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import numpy as np

from research.data.iterator_state import GlobalStateIterator


class _ProcessRows:
  def __init__(self, process_index: int, per_process: int, global_batch: int):
    self.start, self.per_process, self.global_batch = (
        process_index * per_process, per_process, global_batch)

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, x in batch.items():
      x = np.asarray(x)
      if len(x) < self.global_batch:  # Last batch of a finite pass: zero rows, mask 0.
        x = np.concatenate([x, np.zeros((self.global_batch - len(x),) + x.shape[1:], x.dtype)])
      out[k] = x[self.start:self.start + self.per_process]
    return out


def example_iterator(source: Sequence[Any], encode: Callable[[Any], dict[str, np.ndarray]], *,
                     seed: int, batch_size_per_process: int, process_index: int = 0,
                     process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                     num_threads: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator (``get_state``/``set_state``) of encoded batches."""
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  if repeat:
    ds = ds.repeat(None)  # Each epoch reshuffled.
  global_batch = batch_size_per_process * process_count
  # drop_remainder when infinite: grain's length arithmetic overflows otherwise.
  ds = (ds.map(encode).batch(global_batch, drop_remainder=repeat)
        .map(_ProcessRows(process_index, batch_size_per_process, global_batch)))
  # The state is a global batch index (the same on every process): it restores under any
  # process count (research/data/iterator_state.py).
  return GlobalStateIterator(iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=2 * num_threads))))
