"""Checks a config and workdir before anything is built, compiled or downloaded.

:func:`validate_config` is the one pass over every section: top-level keys, ``model``,
``mesh``, ``optimizer``, ``data`` and the feature sections (research/feature_validation.py),
plus finiteness of every float. Every failure is a :class:`ConfigError` with a one-line
message that names the key and the fix. Checks that need the mesh (divisibility) or the
tokenizer (vocab sizes) run in the trainer right after those exist, still before
compilation.
"""

from __future__ import annotations

import math
import os
import uuid

import ml_collections

from research.config import ConfigError, check_known_keys
from research.data.catalog import validate_data_config
from research.feature_validation import validate_features
from research.models import cudnn_rules
from research.models.transformer import resolved_dims, validate_model_config
from research.optim import validate_optimizer_config
from research import wandb_writer
from research.sharding import batch_shards, validate_mesh_config

POSITIVE_INT_KEYS = ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
                     'checkpoint_every', 'keep_checkpoints')


def check_workdir(workdir: str) -> None:
  """The workdir exists or can be created, and a file can be written in it."""
  if not workdir:
    raise ConfigError('--workdir is required; pass --workdir=DIR (a writable directory).')
  probe = os.path.join(workdir, f'.write_probe_{uuid.uuid4().hex}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'workdir {workdir!r} is not writable ({e.strerror or e}); '
        f'pass --workdir=DIR with a directory you can write to.') from None


def check_batch_divisibility(config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                             process_count: int) -> None:
  expert = mesh_shape.get('expert', 1)  # The batch is split over 'expert' too (MoE).
  shards = batch_shards(mesh_shape)
  names = 'mesh.data*mesh.fsdp' + ('*mesh.expert' if expert > 1 else '')
  sizes = f'{mesh_shape["data"]}*{mesh_shape["fsdp"]}' + (f'*{expert}' if expert > 1 else '')
  b = config.batch_size
  if b % shards:
    raise ConfigError(
        f'batch_size={b} is not divisible by the data shards {names}={sizes}={shards}; '
        f'use a multiple of {shards}.')
  if b % process_count:
    raise ConfigError(
        f'batch_size={b} is not divisible by the {process_count} processes; '
        f'use a multiple of {process_count}.')
  seq = mesh_shape.get('sequence', 1)
  if config.seq_len % seq:
    raise ConfigError(
        f'seq_len={config.seq_len} is not divisible by mesh.sequence={seq}; use a multiple '
        f'of {seq}.')
  sp = seq * mesh_shape.get('tensor', 1)
  if config.mesh.get('sequence_parallel', False) and config.seq_len % sp:
    raise ConfigError(
        f'mesh.sequence_parallel=True splits the residual stream over mesh.sequence*'
        f'mesh.tensor={sp} but seq_len={config.seq_len} is not a multiple; use a multiple.')
  k = config.optimizer.grad_accum_steps
  if b % k or (b // k) % shards:
    raise ConfigError(
        f'optimizer.grad_accum_steps={k}: batch_size={b} must split into {k} micro-batches '
        f'each divisible by the {shards} data shards; use batch_size a multiple of {k * shards}.')
  check_pipeline(config, mesh_shape)  # Micro-batches per shard, with the resolved mesh.


def check_pipeline(config: ml_collections.ConfigDict, mesh_shape: dict[str, int] | None = None
                   ) -> None:
  """The model.pipeline_* keys, and what mesh.stage > 1 needs (research/models/pipeline.py).

  Without ``mesh_shape`` (before the mesh exists) a ``-1`` stage axis is not checked;
  with it, the per-shard batch must split into the micro-batches.
  """
  from research.models import pipeline
  m = config.model
  for key in ('pipeline_microbatches', 'pipeline_repeats'):
    v = m.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f'model.{key}={v!r} must be an integer >= 0 (0: the default).')
  schedule = m.get('pipeline_schedule', 'gpipe')
  if schedule not in pipeline.SCHEDULES:
    raise ConfigError(f'model.pipeline_schedule={schedule!r} is unknown; use one of '
                      f'{", ".join(map(repr, pipeline.SCHEDULES))}.')
  stages = (mesh_shape or {}).get('stage', config.mesh.get('stage', 1))
  if stages in (1, -1):
    return
  if not m.scan_layers:
    raise ConfigError(f'mesh.stage={stages} (pipeline parallelism) needs model.scan_layers=True '
                      f'(the stacked layers are split over the stages); set it, or mesh.stage=1.')
  if m.dropout:
    raise ConfigError(f'mesh.stage={stages} (pipeline parallelism) does not support '
                      f'model.dropout={m.dropout}; set model.dropout=0.0 or mesh.stage=1.')
  if schedule == 'gpipe' and m.get('pipeline_repeats', 0) > 1:
    raise ConfigError(f"model.pipeline_repeats={m.pipeline_repeats} needs "
                      f"model.pipeline_schedule='circular' (GPipe visits each stage once).")
  sch = pipeline.resolve_config(m, stages)
  if m.num_layers % (stages * sch.repeats):
    raise ConfigError(
        f'model.num_layers={m.num_layers} is not divisible by mesh.stage*pipeline_repeats='
        f'{stages}*{sch.repeats}={stages * sch.repeats}; every stage needs the same number '
        f'of layers per repeat: change num_layers, mesh.stage or model.pipeline_repeats.')
  if schedule == 'circular' and sch.repeats < 2:
    raise ConfigError(
        f"model.pipeline_schedule='circular' with {sch.repeats} repeat is GPipe: set "
        f"model.pipeline_repeats >= 2 (num_layers={m.num_layers} >= 2*mesh.stage) or "
        f"model.pipeline_schedule='gpipe'.")
  if sch.repeats > 1 and sch.microbatches < stages:
    raise ConfigError(
        f"model.pipeline_microbatches={sch.microbatches} < mesh.stage={stages}: the circular "
        f"schedule needs at least one micro-batch per stage; use >= {stages}.")
  if mesh_shape is None:
    return
  shards = batch_shards(mesh_shape)
  k = config.optimizer.grad_accum_steps
  sizes = {config.batch_size, *tuple(config.batch_ramp.get('batch_sizes', ()) or ())}
  for b in sorted(sizes):
    if b % (k * shards) == 0 and (b // (k * shards)) % sch.microbatches:
      raise ConfigError(
          f'batch_size={b} gives {b // (k * shards)} sequences per data shard and '
          f'grad-accumulation step, not divisible by model.pipeline_microbatches='
          f'{sch.microbatches}; use a batch_size multiple of {k * shards * sch.microbatches} '
          f'or fewer micro-batches.')


def check_tensor_divisibility(model_cfg: ml_collections.ConfigDict, tensor: int) -> None:
  if tensor == 1:
    return
  dims = resolved_dims(model_cfg)
  for key, value in (('model.num_heads', model_cfg.num_heads),
                     ('model.num_kv_heads', dims['num_kv_heads']),
                     ('model.mlp_dim', dims['mlp_dim'])):
    if value % tensor:
      raise ConfigError(
          f'mesh.tensor={tensor} does not divide {key}={value}; use a mesh.tensor that divides it.')


def check_expert_mesh(config: ml_collections.ConfigDict) -> None:
  """mesh.expert > 1 needs MoE layers whose experts it divides; MoE composes with the
  features whose objective carries its aux losses (not distillation)."""
  e, ep = config.model.moe_num_experts, config.mesh.expert
  if ep not in (1, -1) and not e:
    raise ConfigError(f'mesh.expert={ep} needs mixture-of-experts layers; set '
                      f'model.moe_num_experts to a multiple of {ep}, or mesh.expert=1.')
  if e and ep not in (1, -1) and e % ep:
    raise ConfigError(f'mesh.expert={ep} does not divide model.moe_num_experts={e}; use a '
                      f'mesh.expert that divides it.')
  if e and config.distill.teacher:
    raise ConfigError('distill.teacher is not supported for a mixture-of-experts student '
                      '(model.moe_num_experts > 0); distil into a dense model.')


def check_finite(config: ml_collections.ConfigDict, prefix: str = '') -> None:
  """Every float in the config is a number (no NaN or infinity), whatever its key."""
  for key, value in config.items():
    dotted = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      check_finite(value, f'{dotted}.')
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'{dotted}={value!r} is not a finite number; set a real value '
                        f'(see its default in research/config.py).')


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


# (key, predicate, what it must be): values that pass the type and finiteness checks
# but cannot train (found by tests/test_fuzz.py); each is one ConfigError naming the key.
RANGE_CHECKS = (
    ('optimizer.warmup_steps', lambda v: isinstance(v, int) and v >= 0, 'an integer >= 0'),
    ('optimizer.decay_steps', lambda v: isinstance(v, int) and v >= 0, 'an integer >= 0 (0: steps)'),
    ('optimizer.clip_norm', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (0: no clipping)'),
    ('optimizer.weight_decay', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('optimizer.b1', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.b2', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.eps', lambda v: _is_number(v) and v > 0, 'a number > 0'),
    ('optimizer.momentum', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.min_lr_ratio', lambda v: _is_number(v) and 0 <= v <= 1, 'in [0, 1]'),
    ('loss.z_loss', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (0: off)'),
    ('model.dropout', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('model.init_std', lambda v: _is_number(v) and v > 0, 'a number > 0'),
    ('model.norm_eps', lambda v: _is_number(v) and v > 0, 'a number > 0'),
    ('model.rope_theta', lambda v: _is_number(v) and v > 0, 'a number > 0'),
    ('eval_tokens', lambda v: isinstance(v, int) and v >= -1,
     'an integer >= -1 (0: eval_steps batches, -1: the whole eval split)'),
    ('num_samples', lambda v: isinstance(v, int) and v >= 0, 'an integer >= 0'),
    ('sample_len', lambda v: isinstance(v, int) and v >= 1, 'an integer >= 1'),
    ('sample_temperature', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (0: greedy)'),
    ('sample_top_k', lambda v: isinstance(v, int) and v >= 0, 'an integer >= 0 (0: off)'),
)


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _is_pairs(value) -> bool:
  return isinstance(value, (tuple, list)) and all(
      isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in value)


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Numeric ranges and the shape of pair-list keys (RANGE_CHECKS)."""
  for key, ok, want in RANGE_CHECKS:
    value = _get(config, key)
    if value is not _MISSING and not ok(value):
      raise ConfigError(f'{key} must be {want}, got {value!r}.')
  for key in ('optimizer.lr_multipliers', 'finetune.pretrain_overrides'):
    value = _get(config, key)
    if value is not _MISSING and not _is_pairs(value):
      raise ConfigError(f"{key} must be a tuple of (string, value) pairs, e.g. "
                        f"(('regex', 0.1),), got {value!r}.")
  for regex, mult in _get(config, 'optimizer.lr_multipliers') or ():
    if not _is_number(mult) or not math.isfinite(mult) or mult < 0:
      raise ConfigError(f'optimizer.lr_multipliers: the multiplier of {regex!r} must be a '
                        f'finite number >= 0, got {mult!r}.')


def validate_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """All static checks of every section; call before building anything."""
  check_known_keys(config)
  check_finite(config)
  check_ranges(config)
  for key in POSITIVE_INT_KEYS:
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ConfigError(f'{key} must be a positive integer, got {config[key]!r}.')
  if not isinstance(config.log_every_s, (int, float)) or config.log_every_s <= 0:
    raise ConfigError(f'log_every_s must be a positive number of seconds, got '
                      f'{config.log_every_s!r}.')
  if config.eval_steps < 0:
    raise ConfigError(f'eval_steps must be >= 0, got {config.eval_steps}.')
  if config.nan_policy not in ('stop', 'skip'):
    raise ConfigError(f"nan_policy={config.nan_policy!r} is unknown; use 'stop' or 'skip'.")
  cs = config.loss.chunk_size
  if cs < 0 or (cs and config.seq_len % cs):
    raise ConfigError(f'loss.chunk_size={cs} must be 0 (off) or divide seq_len={config.seq_len}.')
  validate_model_config(config.model, config.seq_len)
  cudnn_rules.check(config)  # model.attention_impl='cudnn': what the kernel cannot run.
  validate_mesh_config(config.mesh)
  check_pipeline(config)  # mesh.stage > 1: what the pipeline needs (static part).
  check_expert_mesh(config)
  validate_optimizer_config(config.optimizer)
  validate_features(config)
  if config.eval_tasks:
    from research.downstream.tasks import parse_specs
    try:
      parse_specs(config.eval_tasks)
    except ValueError as e:
      raise ConfigError(f'eval_tasks={config.eval_tasks!r}: {e}') from None
  wandb_writer.validate(config.wandb)
  validate_data_config(config.data)
  if workdir is not None:
    check_workdir(workdir)
