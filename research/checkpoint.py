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

A committed step can still go bad afterwards (a data file truncated or deleted by a
full disk, a partial copy, a bad sector). ``restore`` then falls back: it logs which
step and why, moves that step to ``checkpoints/corrupt/<step>-<UTC time>`` (never
deletes it) and restores the newest intact earlier step. A step whose arrays do not
have the model's shapes is not corrupt but from another config: that stays a
one-line error, nothing is moved.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import shutil
import weakref
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from research.data import iterator_state
from research import runtime
from research.runtime import UserError

CORRUPT_DIR = 'corrupt'  # Under the checkpoints directory; not a step name Orbax reads.


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


def _short_reason(e: BaseException, limit: int = 200) -> str:
  """The informative part of a (TensorStore) error: its status code and message."""
  texts = []
  while e is not None and len(texts) < 5:
    texts.append(' '.join(str(e).split()))
    e = e.__cause__ or e.__context__
  for t in texts:
    found = re.search(r'\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|'
                      r'INVALID_ARGUMENT|UNKNOWN|INTERNAL): [^\[]*', t)
    if found:
      return found.group(0).strip()[:limit]
  text = texts[0] if texts and texts[0] else type(e).__name__
  return text if len(text) <= limit else text[:limit] + '...'


def _all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process (a corrupt shard may fail on one only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class _CorruptStep(Exception):
  """A step that cannot be read although its arrays have the model's shapes."""


_open_checkpointers: 'weakref.WeakSet[Checkpointer]' = weakref.WeakSet()


def close_all_open() -> None:
  """Waits for and closes every open checkpointer (entry points call this on an error
  exit, so Orbax's async save threads end before the interpreter shuts down)."""
  for c in list(_open_checkpointers):
    try:
      c._mgr.wait_until_finished()  # pylint: disable=protected-access
    finally:
      c._mgr.close()  # pylint: disable=protected-access
      _open_checkpointers.discard(c)


runtime.on_error_exit(close_all_open)


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
    _open_checkpointers.add(self)

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
           *, force: bool = False, replace: bool = False) -> None:
    """Starts an async save (errors of the previous one surface here, as CheckpointError).

    ``replace=True`` first deletes an existing save of ``step``: for outputs that are
    recomputed in place on a rerun (the integer export of ``launch.quantize``).
    """
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    if replace and step in self.all_steps():
      self._mgr.wait_until_finished()
      self._mgr.delete(step)
    try:
      self._mgr.save(step, args=ocp.args.Composite(**items), force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise CheckpointError(
          f'checkpoint step {step} already exists in {self.directory}; a second run on '
          'this workdir? Use another --workdir.') from None
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(step, e) from None

  def read_meta(self, step: int) -> dict[str, Any] | None:
    """The ``meta`` item of ``step`` alone (nothing else read), or None if unreadable."""
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception:  # pylint: disable=broad-except  (a corrupt step: restore() decides)
      return None
    return dict(restored.meta)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores ``state`` into ``abstract_state``'s shardings, the iterator in place.

    If ``step`` is corrupt, restores the newest intact earlier step instead (the
    returned meta's ``step`` says which) and moves the corrupt ones aside; raises a
    one-line CheckpointError if none is intact or the checkpoint is from another model.
    """
    corrupt: list[tuple[int, str]] = []
    for s in sorted((s for s in self.all_steps() if s <= step), reverse=True):
      error: BaseException | None = None
      # A failed TensorStore read leaves coroutines that print tracebacks to stderr
      # later (at garbage collection); keep those in the log file.
      with runtime.quiet_stderr():
        try:
          result = self._restore_step(s, abstract_state, data_iterator)
        except CheckpointError:
          raise
        except Exception as e:  # pylint: disable=broad-except  (TensorStore: Exception)
          error = e
        if error is not None:
          gc.collect()
      if not _all_processes_agree(error is None):
        reason = _short_reason(error) if error is not None else 'failed on another process'
        logging.warning('checkpoint step %d in %s cannot be restored (%s); trying the '
                        'previous step.', s, self.directory, reason)
        corrupt.append((s, reason))
        continue
      for bad, reason in corrupt:
        where = self._move_aside(bad)
        logging.warning('checkpoint step %d was corrupt (%s): moved to %s; resumed from '
                        'step %d instead.', bad, reason, where, s)
      if corrupt:
        self._mgr.reload()
      return result
    if not corrupt:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} does not exist; '
                            'use a fresh --workdir.')
    newest, reason = corrupt[0]
    raise CheckpointError(
        f'checkpoint step {newest} in {self.directory} cannot be restored ({reason}) and no '
        f'earlier step is intact ({len(corrupt)} tried); nothing was moved or deleted. Move '
        f'{self.directory} away to start from step 0, or use a fresh --workdir.')

  def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any
                    ) -> tuple[Any, dict[str, Any]]:
    """One step; CheckpointError if it is from another model, other errors if corrupt."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    step_dir = os.path.join(self.directory, str(step))
    if data_iterator is not None:  # A global position restores under any process count.
      items.update(iterator_state.restore_items(step_dir, data_iterator, jax.process_index(),
                                                jax.process_count()))
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      mismatch = self._shape_mismatch(step, abstract_state)
      if mismatch is None:
        raise _CorruptStep(_short_reason(e)) from e
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} does not match this model/config '
          f'({first[:300] if isinstance(e, (ValueError, KeyError, TypeError)) else mismatch}); '
          f'use a fresh --workdir or the config that wrote it.') from None
    if data_iterator is not None:
      iterator_state.restore_global(step_dir, data_iterator)
    return restored.state, dict(restored.meta)

  def _shape_mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How the step's saved arrays differ from the model's; None when they have the
    same shapes or cannot be read (then the step is corrupt, not from another model)."""
    try:
      saved = self._mgr.item_metadata(step)['state']
      saved_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(saved))
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: corrupt)
      return None
    if not saved_shapes:
      return None
    wanted = sorted(tuple(x.shape) for x in jax.tree.leaves(abstract_state))
    if saved_shapes == wanted:
      return None
    if len(saved_shapes) != len(wanted):
      return f'{len(saved_shapes)} saved arrays, the model has {len(wanted)}'
    a, b = next((a, b) for a, b in zip(saved_shapes, wanted) if a != b)
    return f'a saved array has shape {a} where the model has {b}'

  def _move_aside(self, step: int) -> str:
    """Moves a corrupt step to ``corrupt/<step>-<UTC time>`` (process 0; all wait)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    target = os.path.join(self.directory, CORRUPT_DIR, f'{step}-{stamp}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    return target

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      raise self._save_failed(None, e) from None

  def close(self) -> None:
    self.wait()
    self._mgr.close()
    _open_checkpointers.discard(self)
