"""Runs on disk: the one module that reads another run's directory.

A *run directory* is what ``launch.train --workdir=DIR`` writes (DESIGN.md's output
contract): ``config.json``, ``checkpoints/<step>/``, ``summary.json`` when finished.
Fine-tuning sources, QAT/PTQ float runs, distillation teachers, exports and the
eval/generate commands all read runs through here:

* :func:`resolve` names a run from a config value (relative to the sweep sibling);
* :func:`read_config` gives its config on today's schema (keys the schema no longer
  has are dropped; values whose type changed keep today's default, with a warning);
* :func:`checkpoint_steps` lists its committed steps;
* :func:`restore_params` reads its model parameters (Orbax partial restore, straight
  into the target shardings, so the source may have been saved on any mesh);
* :func:`restore_hf_params` does the same for a Hugging Face checkpoint directory.

Building a run's *model* needs the recipe's composition (LoRA modules, masks):
:func:`research.recipe.load_run_model`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research import run_logs
from research.config import base_config
from research.runtime import UserError

CONFIG = run_logs.CONFIG
SUMMARY = run_logs.SUMMARY
CHECKPOINTS = 'checkpoints'


class RunError(UserError, ValueError):
  """A run directory cannot be read as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- naming


def resolve(path: str, workdir: str | None = None) -> str:
  """A run directory named in a config as an absolute path: ``~`` expanded, relative
  paths taken from ``workdir``'s parent (sweep siblings), a trailing ``checkpoints``
  dropped."""
  path = os.path.expanduser(path)
  if not os.path.isabs(path) and workdir:
    path = os.path.join(os.path.dirname(os.path.abspath(workdir)), path)
  path = os.path.abspath(path)
  if os.path.basename(path) == CHECKPOINTS:
    path = os.path.dirname(path)
  return path


def is_hf_dir(path: str) -> bool:
  """A Hugging Face checkpoint directory (read-only source, never a run of ours)."""
  from research.models import hf_import
  return hf_import.is_hf_checkpoint(path)


def is_run_dir(path: str) -> bool:
  """A directory written by our trainer (its config.json has a 'config' section)."""
  meta = run_logs.read_json(os.path.join(path, CONFIG))
  return isinstance(meta, dict) and isinstance(meta.get('config'), dict)


def is_finished(path: str) -> bool:
  return os.path.exists(os.path.join(path, SUMMARY))


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (tmp file + rename): a reader never sees half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def run_metadata(config: ml_collections.ConfigDict, mesh, params: dict[str, int],
                 corpus: dict[str, Any]) -> dict[str, Any]:
  """What ``config.json`` holds: the resolved config and where/how the run ran."""
  import platform
  dev = jax.devices()[0]
  return {
      'config': config.to_dict(),
      'jax_version': jax.__version__,
      'python_version': platform.python_version(),
      'device_kind': dev.device_kind,
      'platform': dev.platform,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'mesh_shape': dict(mesh.shape),
      'param_count': params,
      'corpus': corpus,
  }


# --------------------------------------------------------------------------- config


def merge_into(dst: ml_collections.ConfigDict, src: dict[str, Any], where: str = '') -> None:
  """Copies ``src`` values onto ``dst``'s keys; keys ``dst`` lacks are dropped."""
  for k, v in src.items():
    if k not in dst:
      continue  # A key from a newer/older schema.
    if isinstance(dst[k], ml_collections.ConfigDict) and isinstance(v, dict):
      merge_into(dst[k], v, where)
      continue
    if isinstance(v, list):
      v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    try:
      dst[k] = v
    except TypeError:  # The key changed type since that run: keep today's default.
      logging.warning('%s: ignoring %s=%r (the key changed type)', where, k, v)


def read_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config that wrote ``run_dir`` on today's schema."""
  meta = run_logs.read_json(os.path.join(run_dir, CONFIG))
  if not isinstance(meta, dict):
    raise RunError(f'{run_dir} has no readable {CONFIG}; point at a --workdir written by '
                   f'launch.train (or at its checkpoints/ directory).')
  config = base_config()
  merge_into(config, meta.get('config', meta), run_dir)
  return config


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(path: str) -> str:
  return os.path.join(resolve(path), CHECKPOINTS)


def checkpoint_steps(path: str) -> list[int]:
  """Committed steps of a run (temporary and corrupt-aside directories excluded)."""
  d = checkpoint_dir(path)
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()
                and os.path.isdir(os.path.join(d, s, 'state')))


def has_checkpoint(path: str) -> bool:
  return bool(checkpoint_steps(path))


def pick_step(path: str, step: int, what: str) -> int:
  """``step`` (-1: the latest) checked against the run's steps; ``what`` names the key."""
  steps = checkpoint_steps(path)
  if not steps:
    raise RunError(f'{what}: no checkpoint in {checkpoint_dir(path)}; train that run first '
                   f'(or fix the path).')
  if step == -1:
    return steps[-1]
  if step not in steps:
    raise RunError(f'{what}: step {step} is not in {checkpoint_dir(path)} (steps: {steps}).')
  return step


def _param_shapes(item: str) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{model param path: (shape, dtype)} of a checkpoint's ``state`` item."""
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(item)
  meta = getattr(meta, 'item_metadata', meta)  # StepMetadata (newer) or the tree itself.
  meta = getattr(meta, 'tree', meta)
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]
    if keys[0] != '0' or keys[-1] != 'value':
      continue  # '1/...' is the optimizer; model params end in '/value'.
    shapes['/'.join(keys[1:-1])] = (tuple(leaf.shape), leaf.dtype)
  return shapes


def flat_params(model_state) -> dict[str, nnx.Variable]:
  """{'a/b/kernel': variable} of the ``nnx.Param`` leaves of a model state."""
  return {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(model_state)
          if isinstance(v, nnx.Param)}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    parts = path.split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def check_shapes(pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], source: str
                 ) -> None:
  """One error listing every parameter whose source and target shapes differ."""
  bad = [f'{p}: source {s} vs model {t}' for p, (s, t) in sorted(pairs.items()) if s != t]
  if bad:
    raise RunError(
        f'{len(bad)} parameter(s) of {source} do not fit this model: ' + '; '.join(bad)
        + '. Use the source\'s model.* shape keys (they are copied from its config.json) '
        'and tokenizer/vocabulary.')


def restore_params(path: str, step: int, model_state, what: str = 'source'
                   ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """Reads the ``nnx.Param``s of ``model_state`` that run ``path`` has at ``step``.

  Returns ``({param path: array in the target's sharding}, report)``; the report names
  the source, the step and the source parameters the target does not have.
  """
  import orbax.checkpoint as ocp
  step = pick_step(path, step, what)
  item = os.path.join(checkpoint_dir(path), str(step), 'state')
  src = _param_shapes(item)
  target = flat_params(model_state)
  common = sorted(set(src) & set(target))
  check_shapes({p: (src[p][0], tuple(target[p].shape)) for p in common},
               f'checkpoint {checkpoint_dir(path)} step {step}')
  tree = {'0': _nest({f'{p}/value': jax.ShapeDtypeStruct(
      target[p].shape, target[p].dtype, sharding=target[p].sharding) for p in common})}
  restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args, partial_restore=True))
  arrays = {}
  for p in common:
    node = restored['0']
    for part in p.split('/'):
      node = node[part]
    arrays[p] = node['value']
  report = {'source': checkpoint_dir(path), 'kind': 'checkpoint', 'step': step,
            'ignored': sorted(set(src) - set(target))}
  return arrays, report


def restore_hf_params(path: str, model_cfg, model_state
                      ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
  """:func:`restore_params` for a Hugging Face checkpoint directory (read only)."""
  from research.models import hf_import
  src = hf_import.load_params(path, model_cfg)
  target = flat_params(model_state)
  common = sorted(set(src) & set(target))
  check_shapes({p: (tuple(src[p].shape), tuple(target[p].shape)) for p in common},
               f'HF checkpoint {path}')
  arrays = {}
  for p in common:
    host = np.asarray(src[p], dtype=target[p].dtype)
    arrays[p] = jax.make_array_from_callback(host.shape, target[p].sharding,
                                             lambda idx, h=host: h[idx])
  report = {'source': os.path.abspath(path), 'kind': 'hf', 'step': None,
            'ignored': sorted(set(src) - set(target))}
  return arrays, report


def replace_params(state, arrays: dict[str, jax.Array], prefix: tuple = (0,)):
  """``state`` (an nnx.State) with the variables under ``prefix`` whose remaining path
  is in ``arrays`` replaced by those arrays."""
  n = len(prefix)
  out = []
  for path, var in nnx.to_flat_state(state):
    key = '/'.join(map(str, path[n:])) if tuple(path[:n]) == prefix else None
    if key in arrays:
      var = var.replace(arrays[key])
    out.append((path, var))
  return nnx.from_flat_state(out)


def param_count(flat: dict[str, nnx.Variable], names) -> int:
  return sum(int(math.prod(flat[n].shape)) for n in names)
