"""The recipe layer: composes a run from its config around the trainer.

``run(config, workdir)`` is what ``launch.train`` calls. It validates every section
in one pass, then

1. dispatches PTQ (``quant.mode='ptq'``: no training, research/quant/ptq.py);
2. lets each active feature *prepare* the config before anything is built: resolve
   its source run, train that source first when the config says so
   (``finetune.pretrain_config``, ``distill.teacher_config``), copy the source's
   architecture and tokenizer;
3. builds the tokenizer and the base task, and applies the feature wrappers in
   :data:`FEATURES` order (each returns a new :class:`research.tasks.Task`);
4. calls :func:`research.train.train`, which only trains.

A feature is a module with ``NAME``, ``wrap(task, config, ctx) -> Task`` and optionally
``prepare(config, workdir, ctx)`` and ``tokenizer(config, default) -> tokenizer``;
:func:`research.feature_validation.active_features` says which apply. The trainer
never imports a feature package; features import the trainer's modules, never this one
(they get what they need from it through :class:`Context`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging
from flax import nnx

from research import backend_defaults, runs
from research import sharding as shd
from research import workdir_lock
from research.compress import distill, prune
from research.config import ConfigError, override
from research.data import tokenizers
from research.feature_validation import active_features
from research.finetune import feature as finetune
from research.quant import ptq, qat, qat_init
from research.tasks import Task, make_task
from research.train import train
from research.train_state import create_train_state, resolve_vocab
from research.validation import validate_config

# The feature modules by name, in the order the wrappers apply (QAT quantizes the base
# model's matmuls; LoRA adapters go on top; the teacher and the masks come last).
FEATURES = {m.NAME: m for m in (qat, qat_init, finetune, distill, prune)}


@dataclasses.dataclass(frozen=True)
class Context:
  """What a feature may ask of the recipe."""
  workdir: str | None
  compose: Callable[[ml_collections.ConfigDict], Task]
  ensure_trained: Callable[[str, str, Any, str], None]


# --------------------------------------------------------------------------- sources


@contextlib.contextmanager
def _waiting_lock(path: str):
  """Blocks until no other process on this machine trains the same source."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_config(spec: str, key: str) -> ml_collections.ConfigDict:
  """The config of ``FILE[:arg]`` (or a shipped config's short name) named by ``key``."""
  from research import config_files
  try:
    module, arg = config_files.load_config_module(spec)
  except ConfigError as e:
    raise ConfigError(f'{key}: {e}') from None
  return module.get_config(arg) if arg else module.get_config()


def ensure_trained(path: str, config_spec: str, overrides: Any, key: str) -> None:
  """Trains ``config_spec`` (``FILE[:arg]``) into source ``path`` unless it is there.

  A source is only ever written where the config says so (``key`` names the config
  key that asked): a Hugging Face directory is a read-only source, a finished run is
  used as it is, and a directory that holds anything other than an unfinished run of
  ours is refused rather than trained into.
  """
  if not config_spec or runs.is_hf_dir(path) or runs.is_finished(path):
    return
  if os.path.isdir(path) and os.listdir(path) and not runs.is_run_dir(path):
    raise runs.RunError(
        f'{key}: {path} exists and is not a training run of ours (no config.json written '
        f'by launch.train); refusing to train into it. Point the source key at a run '
        f'directory or an HF checkpoint directory (config.json + *.safetensors).')
  # A file lock lets concurrent runs (a parallel sweep) share one source training.
  # The processes of one multi-process job all train it together (collectives).
  lock = (_waiting_lock(path.rstrip('/') + '.lock') if jax.process_count() == 1
          else contextlib.nullcontext())
  with lock:
    if runs.is_finished(path):
      return
    source_config = load_config(config_spec, key)
    override(source_config, {k: v for k, v in overrides})
    logging.info('%s: training %s into %s first', key, config_spec, path)
    t = time.time()
    run(source_config, path)
    logging.info('%s: source trained in %.0fs', key, time.time() - t)


# --------------------------------------------------------------------------- compose


def _context(workdir: str | None) -> Context:
  return Context(workdir=workdir, compose=compose_task, ensure_trained=ensure_trained)


def prepare(config: ml_collections.ConfigDict, workdir: str | None, *,
            train_sources: bool = True) -> None:
  """Each active feature adjusts ``config`` in place from its source (see module doc).

  ``train_sources=False`` (planning, loading a run) never trains a missing source.
  """
  ctx = _context(workdir)
  if not train_sources:
    ctx = dataclasses.replace(ctx, ensure_trained=lambda *a: None)
  for name in active_features(config):
    mod = FEATURES[name]
    if hasattr(mod, 'prepare'):
      mod.prepare(config, workdir, ctx)


def compose_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
  """The base task of ``config`` with every active feature's wrapper applied."""
  task = make_task(config)
  ctx = _context(workdir)
  for name in active_features(config):
    task = FEATURES[name].wrap(task, config, ctx)
  return task


def make_tokenizer(config: ml_collections.ConfigDict, workdir: str | None):
  """The run's tokenizer: ``data.*``'s, or a feature's source's (an HF tokenizer.json)."""
  tok = tokenizers.make_tokenizer(config.data, workdir)
  for name in active_features(config):
    mod = FEATURES[name]
    if hasattr(mod, 'tokenizer'):
      tok = mod.tokenizer(config, tok)
  return tok


def compose(config: ml_collections.ConfigDict, workdir: str | None = None, *,
            build_tokenizer: bool = True
            ) -> tuple[ml_collections.ConfigDict, Task, Any]:
  """(resolved config copy, composed task, tokenizer) of ``config``, trained nowhere.

  What launch.plan, launch.benchmark and the eval/generate commands build: sources are
  read, never trained. ``build_tokenizer=False`` (planning) takes the vocabulary the
  config declares instead of building (or training) a tokenizer; the tokenizer is None.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  validate_config(config)
  prepare(config, workdir, train_sources=False)
  tokenizer = None
  if build_tokenizer:
    tokenizer = make_tokenizer(config, workdir)
    resolve_vocab(config, tokenizer.vocab_size)
  elif config.model.vocab_size == 0:
    config.model.vocab_size = tokenizers.declared_vocab_size(config.data)
  return config, compose_task(config, workdir), tokenizer


# --------------------------------------------------------------------------- run


def quantize(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Integer export of ``workdir``'s own run, or PTQ of ``quant.init_from`` into it."""
  config = ml_collections.ConfigDict(config.to_dict())
  validate_config(config, workdir)
  with workdir_lock.hold_for_job(workdir):
    return ptq.run(config, workdir, load_run_model)


def run(config: ml_collections.ConfigDict, workdir: str,
        stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``config`` in ``workdir`` with its features; the summary."""
  config = ml_collections.ConfigDict(config.to_dict())  # Own copy; we resolve values.
  validate_config(config, workdir)
  with workdir_lock.hold_for_job(workdir):  # One job per workdir; refused at once.
    if config.quant.mode == 'ptq':  # No training: quantize init_from's checkpoint.
      return ptq.run(config, workdir, load_run_model)
    prepare(config, workdir)
    tokenizer = make_tokenizer(config, workdir)
    resolve_vocab(config, tokenizer.vocab_size)
    backend_defaults.apply(config)  # Opt-in (backend_defaults=True): CPU execution choices.
    task = compose_task(config, workdir)
    return train(config, workdir, task=task, tokenizer=tokenizer, stop_at_step=stop_at_step)


# --------------------------------------------------------------------------- load


def load_run_model(run_dir: str, step: int = -1, variables: Any = nnx.Param,
                   mesh: jax.sharding.Mesh | None = None):
  """(model, config, step): the model of a run (or an export) with its saved weights.

  Built as the run built it (LoRA modules included for a LoRA run; a distillation
  teacher left out: it is not part of the run's model) on ``mesh`` (default: the run's
  mesh config over this host's devices), filled by :func:`research.runs.restore_params`.
  ``variables`` (a type or tuple of types) are the model state restored from the
  checkpoint, e.g. ``(nnx.Param, PruneMask)``; every one of them must be in it.
  """
  config = runs.read_config(run_dir)
  config.finetune.init_from, config.finetune.pretrain_config = '', ''
  config.quant.init_from = ''
  config.distill.teacher, config.distill.teacher_config = '', ''
  if config.quant.mode == 'ptq':
    config.quant.mode = 'none'
  mesh = mesh or shd.mesh_from_config(config.mesh)
  task = compose_task(config)
  ts = create_train_state(config, mesh, task)
  wanted = [(p, v) for p, v in nnx.to_flat_state(ts.state[0]) if isinstance(v, variables)]
  view = nnx.from_flat_state([(p, nnx.Param(v.get_value())) for p, v in wanted])
  arrays, report = runs.restore_params(run_dir, step, view, what=run_dir)
  missing = sorted({'/'.join(map(str, p)) for p, _ in wanted} - set(arrays))
  if missing:
    raise runs.RunError(f'{run_dir} step {report["step"]} lacks parameters {missing[:5]}.')
  model, _ = nnx.merge(ts.graphdef, runs.replace_params(ts.state, arrays))
  return model, config, report['step']
