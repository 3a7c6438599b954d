"""Start a fine-tuning run from a pretrained model: partial restore with a report.

Sources (``finetune.init_from``):
  * one of our runs: its workdir (``config.json`` + ``checkpoints/``) or the
    ``checkpoints/`` directory itself; ``finetune.init_step`` picks the step (-1 latest).
    Only the model parameters are read (Orbax partial restore), straight into the new
    run's shardings, so the source may have been saved on any mesh.
  * a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``),
    Llama-family or GPT-2 (research/models/hf_import.py).

:func:`prepare` (before the tokenizer is built) runs the pretraining first when
``finetune.pretrain_config`` is set and the source has not finished, then copies the
source's architecture (:data:`ARCH_KEYS` of ``model.*``) and tokenizer into the config.
:func:`initialize` (fresh start only) matches parameters by path:
  * loaded: in both (shapes must agree, else :class:`InitError` lists every mismatch);
  * created: only in the new model (task heads, LoRA adapters): keep their init;
  * ignored: only in the source (e.g. ``unembed`` under a classifier).
It writes ``WORKDIR/init_report.json`` and logs the counts, with the trainable and
frozen parameter counts of the run's mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research.config import ConfigError, override
from research.runtime import UserError

# model.* keys that define the backbone's parameters: taken from the source.
ARCH_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
             'mlp_kind', 'mlp_dim', 'norm', 'norm_eps', 'positions', 'rope_theta',
             'max_seq_len', 'tie_embeddings', 'use_bias', 'scan_layers')
# data.* keys that define the tokenizer: taken from one of our sources.
TOKENIZER_KEYS = ('tokenizer', 'spm_vocab_size', 'spm_train_chars')
REPORT = 'init_report.json'


class InitError(UserError, ValueError):
  """The pretrained source cannot initialise this model; the message says why."""


# --------------------------------------------------------------------------- sources


def source_kind(path: str) -> str:
  """'hf' (config.json with model_type + safetensors) or 'checkpoint' (ours)."""
  from research.models import hf_import
  return 'hf' if hf_import.is_hf_checkpoint(path) else 'checkpoint'


def checkpoint_dirs(path: str) -> tuple[str | None, str]:
  """(run workdir or None, checkpoints dir) for a workdir or a checkpoints dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return path, os.path.join(path, 'checkpoints')
  parent = os.path.dirname(path)
  if os.path.exists(os.path.join(parent, 'config.json')):
    return parent, path
  return None, path


def _source_run_config(init_from: str) -> dict[str, Any]:
  workdir, ckpt = checkpoint_dirs(init_from)
  path = os.path.join(workdir or '', 'config.json')
  if not workdir or not os.path.exists(path):
    raise InitError(
        f'finetune.init_from={init_from!r}: no config.json of a run found (expected a '
        f'workdir written by launch.train, or its checkpoints/ directory); set '
        f'finetune.pretrain_config to pretrain it first, or point it at an HF checkpoint.')
  with open(path) as f:
    meta = json.load(f)
  return meta.get('config', meta)


def _run_finished(init_from: str) -> bool:
  workdir, _ = checkpoint_dirs(init_from)
  return bool(workdir) and os.path.exists(os.path.join(workdir, 'summary.json'))


@contextlib.contextmanager
def _file_lock(path: str):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of ``finetune.pretrain_config`` with ``finetune.pretrain_overrides``."""
  from research import sweep  # load_config_module: the FILE[:arg] convention.
  f = config.finetune
  try:
    module, arg = sweep.load_config_module(f.pretrain_config)
  except sweep.SweepError as e:
    raise ConfigError(f'finetune.pretrain_config: {e}') from None
  pcfg = module.get_config(arg) if arg else module.get_config()
  override(pcfg, {k: v for k, v in f.pretrain_overrides})
  return pcfg


def ensure_pretrained(config: ml_collections.ConfigDict) -> None:
  """Pretrains into ``finetune.init_from`` when ``pretrain_config`` is set and the run
  there has no summary.json (resuming a partial one). A file lock makes concurrent
  fine-tuning runs (a parallel sweep) share one pretraining."""
  f = config.finetune
  if not f.pretrain_config or _run_finished(f.init_from):
    return
  workdir = os.path.abspath(os.path.expanduser(f.init_from))
  # One process: a file lock lets concurrent runs share the pretraining. Several
  # processes of one job must all run it together (collectives), so no lock then.
  lock = (_file_lock(workdir.rstrip('/') + '.lock') if jax.process_count() == 1
          else contextlib.nullcontext())
  with lock:
    if _run_finished(workdir):
      return
    from research.train import train  # Late: research.train imports this package.
    logging.info('finetune: pretraining %s into %s first', f.pretrain_config, workdir)
    t = time.time()
    train(pretrain_config(config), workdir)
    logging.info('finetune: pretraining done in %.0fs', time.time() - t)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Pretrains the source if asked, then takes its architecture and tokenizer (in place)."""
  f = config.finetune
  if not f.init_from:
    return
  ensure_pretrained(config)
  if not os.path.exists(os.path.expanduser(f.init_from)):
    raise InitError(f'finetune.init_from={f.init_from!r} does not exist; set it to a '
                    f'pretraining workdir or an HF checkpoint directory (or set '
                    f'finetune.pretrain_config to create it).')
  kind = source_kind(f.init_from)
  if kind == 'hf':
    from research.models import hf_import
    arch = hf_import.model_config(f.init_from)
    arch['scan_layers'] = bool(config.model.scan_layers)  # Import handles both layouts.
  else:
    src = _source_run_config(f.init_from)
    arch = {k: src['model'][k] for k in ARCH_KEYS if k in src.get('model', {})}
    data = src.get('data', {})
    for k in TOKENIZER_KEYS:
      if k in data:
        config.data[k] = data[k]
    _copy_tokenizer(f.init_from, data, workdir)
  changed = {k: (config.model[k], v) for k, v in arch.items() if config.model[k] != v}
  for k, v in arch.items():
    config.model[k] = v
  if changed:
    logging.info('finetune: model.* from %s: %s', f.init_from,
                 ', '.join(f'{k}={v[1]!r}' for k, v in sorted(changed.items())))
  if config.seq_len > config.model.max_seq_len:
    raise ConfigError(f'seq_len={config.seq_len} exceeds the pretrained model\'s '
                      f'max_seq_len={config.model.max_seq_len}; lower seq_len.')


def source_tokenizer(config: ml_collections.ConfigDict, default):
  """The HF source's tokenizer.json (research.models.hf_import.HFTokenizer) when it has
  one; else ``default`` (the ``data.tokenizer`` one, copied from our source's config)."""
  f = config.finetune
  if source_kind(f.init_from) != 'hf':
    return default
  if not os.path.exists(os.path.join(os.path.expanduser(f.init_from), 'tokenizer.json')):
    logging.warning('finetune: HF source %s has no tokenizer.json; using data.tokenizer=%s '
                    '(ids must fit its vocabulary of %d).', f.init_from,
                    config.data.tokenizer, config.model.vocab_size)
    return default
  from research.models import hf_import
  return hf_import.HFTokenizer(os.path.expanduser(f.init_from))


def _copy_tokenizer(init_from: str, data: dict[str, Any], workdir: str) -> None:
  """A SentencePiece source: its model file goes to WORKDIR/tokenizer/ (same ids)."""
  if data.get('tokenizer') != 'sentencepiece':
    return
  from research.data.tokenizers import spm_model_path
  src_workdir, _ = checkpoint_dirs(init_from)
  src, dst = spm_model_path(src_workdir), spm_model_path(workdir)
  if not os.path.exists(src):
    raise InitError(f'finetune.init_from={init_from!r} uses a SentencePiece tokenizer but '
                    f'{src} is missing.')
  if not os.path.exists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst + '.tmp')
    os.replace(dst + '.tmp', dst)


# --------------------------------------------------------------------------- restore


def _flat_params(model_state) -> dict[str, nnx.Variable]:
  return {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(model_state)
          if isinstance(v, nnx.Param)}


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
  """Committed steps of an Orbax checkpoint directory (temporary dirs excluded)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()
                and os.path.isdir(os.path.join(ckpt_dir, d, 'state')))


def _source_arrays(ckpt_dir: str, step: int):
  """(state item path, step, {model param path: (shape, dtype)}) of a checkpoint."""
  import orbax.checkpoint as ocp
  steps = _checkpoint_steps(ckpt_dir)
  if not steps:
    raise InitError(f'finetune.init_from: no checkpoint in {ckpt_dir}.')
  if step == -1:
    step = steps[-1]
  elif step not in steps:
    raise InitError(f'finetune.init_step={step} is not in {ckpt_dir} (steps: {steps}).')
  item = os.path.join(ckpt_dir, str(step), 'state')
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
  return item, step, shapes


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    parts = path.split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _check_shapes(pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], source: str
                  ) -> None:
  bad = [f'{p}: source {s} vs model {t}' for p, (s, t) in sorted(pairs.items()) if s != t]
  if bad:
    raise InitError(
        f'{len(bad)} parameter(s) of {source} do not fit this model: ' + '; '.join(bad[:8])
        + ('; ...' if len(bad) > 8 else '')
        + '. Use the source\'s model.* shape keys (they are copied from its config.json) '
        'and tokenizer/vocabulary.')


def restore_from_checkpoint(init_from: str, step: int, model_state) -> tuple[dict, dict]:
  """Reads the model parameters of ``model_state`` that the source has.

  Returns ``({path: array in the target sharding}, report)``.
  """
  _, ckpt_dir = checkpoint_dirs(init_from)
  path, step, src = _source_arrays(ckpt_dir, step)
  target = _flat_params(model_state)
  common = sorted(set(src) & set(target))
  _check_shapes({p: (src[p][0], tuple(target[p].shape)) for p in common},
                f'checkpoint {ckpt_dir} step {step}')
  import orbax.checkpoint as ocp
  item = {'0': _nest({f'{p}/value': jax.ShapeDtypeStruct(
      target[p].shape, target[p].dtype, sharding=target[p].sharding) for p in common})}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  arrays = {}
  for p in common:
    node = restored['0']
    for part in p.split('/'):
      node = node[part]
    arrays[p] = node['value']
  report = {'source': os.path.abspath(ckpt_dir), 'kind': 'checkpoint', 'step': step,
            'ignored': sorted(set(src) - set(target))}
  return arrays, report


def restore_from_hf(init_from: str, model_cfg, model_state) -> tuple[dict, dict]:
  from research.models import hf_import
  src = hf_import.load_params(init_from, model_cfg)
  target = _flat_params(model_state)
  common = sorted(set(src) & set(target))
  _check_shapes({p: (tuple(src[p].shape), tuple(target[p].shape)) for p in common},
                f'HF checkpoint {init_from}')
  arrays = {}
  for p in common:
    host = np.asarray(src[p], dtype=target[p].dtype)
    arrays[p] = jax.make_array_from_callback(host.shape, target[p].sharding,
                                             lambda idx, h=host: h[idx])
  report = {'source': os.path.abspath(init_from), 'kind': 'hf', 'step': None,
            'ignored': sorted(set(src) - set(target))}
  return arrays, report


def _count(flat: dict[str, nnx.Variable], names) -> int:
  return sum(int(math.prod(flat[n].shape)) for n in names)


def initialize(config: ml_collections.ConfigDict, ts, task, workdir: str):
  """The train state with the source's parameters loaded (fresh runs only); writes the
  report. Returns the new ``ts.state``."""
  model_state = ts.state[0]
  target = _flat_params(model_state)
  f = config.finetune
  if f.init_from:
    if source_kind(f.init_from) == 'hf':
      arrays, report = restore_from_hf(f.init_from, config.model, model_state)
    else:
      arrays, report = restore_from_checkpoint(f.init_from, f.init_step, model_state)
  else:
    arrays, report = {}, {'source': None, 'kind': 'scratch', 'step': None, 'ignored': []}
  trainable = {'/'.join(map(str, p)) for p, _ in
               nnx.to_flat_state(nnx.state(nnx.merge(ts.graphdef, ts.state)[0],
                                           task.trainable))}
  loaded = sorted(arrays)
  created = sorted(set(target) - set(arrays))
  lora = sorted(p for p, v in target.items() if isinstance(v, nnx.LoRAParam))
  report.update(
      mode=f.mode, loaded=loaded, created=created,
      loaded_params=_count(target, loaded), created_params=_count(target, created),
      trainable_params=_count(target, trainable & set(target)),
      frozen_params=_count(target, set(target) - trainable),
      lora_params=_count(target, lora), trainable=sorted(trainable & set(target)))
  logging.info('finetune init from %s (%s, step %s): loaded %d tensors (%s params), created '
               '%d (%s), ignored %d: %s; mode=%s trains %s params, %s frozen',
               report['source'], report['kind'], report['step'], len(loaded),
               f'{report["loaded_params"]:,}', len(created), ', '.join(created[:6]) +
               (' ...' if len(created) > 6 else ''), len(report['ignored']),
               ', '.join(report['ignored'][:4]), f.mode, f'{report["trainable_params"]:,}',
               f'{report["frozen_params"]:,}')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, REPORT), 'w') as fh:
      json.dump(report, fh, indent=2)
  if not arrays:
    return ts.state
  flat = []
  for path, var in nnx.to_flat_state(ts.state):
    key = '/'.join(map(str, path[1:])) if path[0] == 0 else None
    if key in arrays:
      var = var.replace(arrays[key])
    flat.append((path, var))
  return nnx.from_flat_state(flat)
