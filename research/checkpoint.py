"""Orbax checkpoints that hold everything an exact resume needs.

One checkpoint step holds three items:
  * ``state``: the NNX state of (model, optimizer) including the dropout RNG,
    saved as global (sharded) arrays; restored straight into the target shardings,
    which may belong to a different mesh than the one that saved it.
  * ``data``: each process's grain iterator position (grain's own handler writes one
    file per process).
  * ``meta``: JSON with the step, tokens seen and the like.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames
it on commit), so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from research.data import iterator_state
from research.runtime import UserError


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be restored; the message says why and what to do."""


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for restoring onto a mesh."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def resolve_run_dir(path: str, workdir: str) -> str:
  """A run directory named in a config (``quant.init_from``, ``distill.teacher``) as an
  absolute path: ``~`` expanded, relative paths taken from ``workdir``'s parent (sweep
  siblings), a trailing ``checkpoints`` dropped."""
  path = os.path.expanduser(path)
  if not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(workdir)), path)
  path = os.path.abspath(path)
  if os.path.basename(path) == 'checkpoints':
    path = os.path.dirname(path)
  return path


def _os_error_code(e: BaseException) -> int | None:
  """The errno behind a failed save (ENOSPC, EFBIG, EACCES...), wherever it is reported."""
  if isinstance(e, OSError) and e.errno:
    return e.errno
  found = re.search(r"os_error_code='?(\d+)", str(e))
  return int(found.group(1)) if found else None


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with our three items."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # Remove saves a crash left half-written.
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
            'data': grain.checkpoint.CheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
    good = [s for s in self.all_steps() if s != step]
    kept = f'the previous checkpoint (step {max(good)}) is intact' if good else \
        'no earlier checkpoint exists'
    what = 'a checkpoint save'
    reason = ' '.join(str(e).split())
    reason = ('...' + reason[-160:]) if len(reason) > 160 else (reason or type(e).__name__)
    code = _os_error_code(e)
    if code is not None:  # TensorStore buries the OS error deep in a long message.
      reason = f'{os.strerror(code)}: {reason}'
    return CheckpointError(
        f'{what} in {self.directory} failed ({reason}); {kept}. Free disk space or fix '
        f'permissions, then rerun to resume, or pass another --workdir.')

  def save(self, step: int, state: Any, meta: dict[str, Any], data_iterator: Any = None,
           *, force: bool = False) -> None:
    """Starts an async save (errors of the previous one surface here, as CheckpointError)."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self._mgr.save(step, args=ocp.args.Composite(**items), force=force)
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(step, e) from None

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores ``state`` into ``abstract_state``'s shardings, the iterator in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    step_dir = os.path.join(self.directory, str(step))
    if data_iterator is not None:  # A global position restores under any process count.
      items.update(iterator_state.restore_items(step_dir, data_iterator, jax.process_index(),
                                                jax.process_count()))
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} does not match this model/config '
          f'({first[:300]}); use a fresh --workdir or the config that wrote it.') from None
    if data_iterator is not None:
      iterator_state.restore_global(step_dir, data_iterator)
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(None, e) from None

  def close(self) -> None:
    self.wait()
    self._mgr.close()
