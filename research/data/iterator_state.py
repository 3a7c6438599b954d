"""Data-iterator positions in checkpoints that restore under any process count.

grain's checkpoint handler writes one ``data/process_<i>-of-<n>.json`` per process and a
restore reads the file of its own index and count, so a run saved by 2 processes could
not resume with 1 or 4 (``process_0-of-1.json does not exist``). The LM pipeline's
file/store path (and the fine-tuning example iterators) form *global* batches from a
stateless global order: every process's state is the same global batch index. Such an
iterator is wrapped in :class:`GlobalStateIterator`; on restore, any one of the saved
files is read and its state set on every process, whatever the process count now.

Per-process states (the tfds streaming path) still need the same process count; a
mismatch is one clear error line instead of grain's ValueError.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import grain

from research.runtime import UserError


class DataStateError(UserError, RuntimeError):
  """A saved data-iterator position cannot be restored here (one line, with the fix)."""


class GlobalStateIterator(grain.DatasetIterator):
  """Passes batches through; marks the wrapped iterator's state as process-independent."""

  global_state = True

  def __next__(self) -> Any:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def is_global(iterator: Any) -> bool:
  return bool(getattr(iterator, 'global_state', False))


def _saved_files(step_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(step_dir, 'data', 'process_*-of-*.json')))


def restore_items(step_dir: str, iterator: Any, process_index: int, process_count: int
                  ) -> dict[str, Any]:
  """Orbax restore args for the ``data`` item: none for a global iterator (it is read by
  :func:`restore_global` instead), grain's handler for a per-process one."""
  if is_global(iterator):
    return {}
  files = _saved_files(step_dir)
  want = os.path.join(step_dir, 'data', f'process_{process_index}-of-{process_count}.json')
  if files and want not in files:
    saved = os.path.basename(files[0]).split('-of-')[-1].removesuffix('.json')
    raise DataStateError(
        f'the data iterator in {step_dir} was saved by {saved} process(es) with per-process '
        f'streams (data.source=tfds); resume with {saved} process(es), or prepare the dataset '
        f'with python -m launch.prepare_data and train with data.source=tokens, whose '
        f'position restores under any process count.')
  return {'data': grain.checkpoint.CheckpointRestore(iterator)}


def restore_global(step_dir: str, iterator: Any) -> None:
  """Sets a global iterator's state from any process's saved file (no-op otherwise)."""
  if not is_global(iterator):
    return
  files = _saved_files(step_dir)
  if not files:
    raise DataStateError(f'checkpoint {step_dir} has no data iterator position (no '
                         f'data/process_*.json); use a fresh --workdir.')
  with open(files[0]) as f:
    iterator.set_state(json.load(f))
