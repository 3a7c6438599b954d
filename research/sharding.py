"""Device mesh, logical-axis rules and activation sharding constraints.

Models name only logical axes (``'batch'``, ``'embed'``, ``'heads'``...). This module
maps them to mesh axes through a rules table, the way MaxText does. Parameter names
and activation names differ (``'embed'`` of a weight is FSDP-sharded; ``'act_embed'``
of an activation is not).

The mesh always has the six axes of :data:`MESH_AXES`; an axis of size 1 costs
nothing, so one rules table serves every layout and the mesh *shape* chooses the
parallelism:

  ``mesh.data=N``    data parallelism: parameters replicated, batch split, gradients
                     all-reduced.
  ``mesh.fsdp=N``    FSDP / ZeRO-3: every weight's ``'embed'`` dimension (and with it
                     the Adam state, which is sharded like its parameter) split N ways;
                     each layer's weights are all-gathered for the forward and
                     backward pass and gradients reduce-scattered. The batch is split
                     over data x fsdp.
  ``mesh.tensor=N``  Megatron-style tensor parallelism: attention heads, the MLP hidden
                     dimension and the vocabulary split N ways inside each layer
                     (column-parallel in, row-parallel out, one all-reduce per block).
  ``mesh.sequence``  context parallelism: every sequence (batch columns, activations)
                     split N ways along its length, weights FSDP-split over it too
                     (``'embed'`` -> fsdp x sequence); attention is ring or all-gather
                     over it with causal load balancing (``mesh.context_parallel``,
                     research/models/context_parallel.py).
  ``mesh.sequence_parallel``  Megatron sequence parallelism: the residual stream between
                     blocks split along L over ``tensor`` too (rule ``residual_seq``);
                     XLA all-gathers it before the column-parallel projections and
                     reduce-scatters after the row-parallel ones.
  ``mesh.expert=N``  expert parallelism (research/models/moe.py): the experts of every
                     MoE layer split N ways ('exp'); the batch is split over it too, so
                     the rest of the model sees it as data parallelism; tokens reach
                     their experts by all-to-all.
  ``mesh.stage=N``   pipeline parallelism (research/models/pipeline.py): the scanned
                     layer stack split into N consecutive blocks ('layers' -> 'stage'),
                     micro-batches passed from stage to stage by collective-permutes.

``mesh.rules`` overrides single rows of :data:`DEFAULT_RULES` (e.g. ``'embed=none'``
turns FSDP sharding of weights off while keeping the batch split), and
``mesh.dcn_data`` lays the data axis across slices/hosts joined by the slower
data-centre network (multi-slice), with the other axes inside each slice.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec as P

# Order matters: the last axes vary fastest over the device list, so 'tensor' (the most
# communication per step) gets neighbouring devices (one NVLink/ICI island). 'stage'
# moves the least (one micro-batch's activations to the next stage per iteration,
# point to point), so it is the slowest-varying axis after 'data' (which alone may span
# slices over DCN): each stage is one contiguous block of devices, and the FSDP
# gathers and tensor all-reduces stay inside it (MaxText's order, too).
MESH_AXES = ('data', 'stage', 'fsdp', 'sequence', 'tensor', 'expert')

Rule = tuple[str, 'str | tuple[str, ...] | None']

# Logical axis -> mesh axes. Every logical name used by a model must appear here.
DEFAULT_RULES: tuple[Rule, ...] = (
    # Activations.
    ('batch', ('data', 'fsdp', 'expert')),  # 'expert': data-parallel outside the experts.
    ('seq', 'sequence'),
    # The residual stream's sequence axis between blocks: ('sequence', 'tensor') with
    # mesh.sequence_parallel (Megatron sequence parallelism).
    ('residual_seq', 'sequence'),
    # K/V's sequence axis inside context-parallel attention: the sequence axes = ring
    # (blocks rotate), none = all-gathered (mesh.context_parallel; models/context_parallel.py).
    ('kv_seq', 'sequence'),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_kv', None),
    # Parameters.
    ('layers', 'stage'),  # Scanned layer stack: consecutive blocks per pipeline stage.
    ('vocab', 'tensor'),
    ('embed', ('fsdp', 'sequence')),  # FSDP; context parallelism shards weights too.
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),  # head_dim
    ('mlp', 'tensor'),
    ('exp', 'expert'),  # MoE: the experts of a layer (research/models/moe.py).
    ('norm', None),
    ('pos', None),  # Learned absolute-position table rows.
    ('classes', None),
    ('lora_rank', None),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def _config_error(message: str) -> Exception:
  from research.config import ConfigError  # Local: avoid an import cycle.
  return ConfigError(message)


# --------------------------------------------------------------------------- config


def validate_mesh_config(mesh_cfg) -> None:
  """Static checks of the ``mesh`` section (no devices needed); one-line errors."""
  for axis in MESH_AXES:
    v = mesh_cfg.get(axis, 1)
    if not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1:
      raise _config_error(f'mesh.{axis}={v!r} must be a positive integer or -1 (all remaining devices).')
  free = [a for a in MESH_AXES if mesh_cfg.get(a, 1) == -1]
  if len(free) > 1:
    raise _config_error(
        f'mesh: only one axis may be -1, got mesh.{free[0]}=-1 and mesh.{free[1]}=-1; '
        f'set mesh.{free[1]} to a number.')
  # mesh.expert needs an MoE model whose experts it divides: research/validation.py.
  if mesh_cfg.get('context_parallel', 'ring') not in ('ring', 'all_gather'):
    raise _config_error(f"mesh.context_parallel={mesh_cfg.context_parallel!r} is unknown; "
                        f"use 'ring' or 'all_gather'.")
  if not isinstance(mesh_cfg.get('sequence_parallel', False), bool):
    raise _config_error(f'mesh.sequence_parallel={mesh_cfg.sequence_parallel!r} must be '
                        f'True or False.')
  dcn = mesh_cfg.dcn_data
  if not isinstance(dcn, int) or isinstance(dcn, bool) or dcn < 1:
    raise _config_error(f'mesh.dcn_data={dcn!r} must be a positive integer (1: one slice).')
  if dcn > 1 and mesh_cfg.data != -1 and mesh_cfg.data % dcn:
    raise _config_error(
        f'mesh.dcn_data={dcn} does not divide mesh.data={mesh_cfg.data}; the data axis is '
        f'laid out as dcn_data slices x (data/dcn_data) devices per slice.')
  rules_from_config(mesh_cfg)  # Validates mesh.rules.


def parse_rules(text: str) -> tuple[Rule, ...]:
  """``'embed=none,mlp=tensor+fsdp'`` -> ``(('embed', None), ('mlp', ('tensor', 'fsdp')))``."""
  out = []
  for i, item in enumerate(p.strip() for p in text.split(',')):
    if not item:
      continue
    name, sep, target = (t.strip() for t in item.partition('='))
    if not sep or not name or not target:
      raise _config_error(
          f'mesh.rules item {i} {item!r} must be logical_axis=mesh_axis (none, one mesh '
          f"axis, or several joined by '+'), e.g. 'embed=none,mlp=tensor'.")
    axes = tuple(a.strip() for a in target.split('+'))
    if len(axes) == 1 and axes[0].lower() == 'none':
      out.append((name, None))
    else:
      out.append((name, axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def rules_from_config(mesh_cfg) -> tuple[Rule, ...]:
  """:data:`DEFAULT_RULES` with the rows named in ``mesh.rules`` replaced.

  ``mesh.rules`` is a string ``'logical=mesh_axis,...'`` (``none`` = replicated,
  ``a+b`` = split over two mesh axes), e.g. ``'embed=none'`` turns off FSDP of the
  weights and ``'mlp=tensor+fsdp'`` splits the MLP width over both axes.
  """
  text = mesh_cfg.get('rules', '') or ''
  if not isinstance(text, str):
    raise _config_error(
        f"mesh.rules={text!r} must be a string like 'embed=none,mlp=tensor+fsdp'.")
  table = dict(DEFAULT_RULES)
  # The two switches are rows of the table (mesh.rules may still override them).
  if mesh_cfg.get('sequence_parallel', False) is True:
    table['residual_seq'] = ('sequence', 'tensor')
  if mesh_cfg.get('context_parallel', 'ring') == 'all_gather':
    table['kv_seq'] = None
  for i, (name, target) in enumerate(parse_rules(text)):
    if name not in table:
      raise _config_error(
          f'mesh.rules: logical axis {name!r} is unknown; use one of {list(LOGICAL_AXES)}.')
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    for a in axes:
      if a not in MESH_AXES:
        raise _config_error(
            f'mesh.rules: mesh axis {a!r} (for {name!r}) is unknown; use none or names '
            f'from {list(MESH_AXES)}.')
    if len(set(axes)) != len(axes):
      raise _config_error(f'mesh.rules: {name!r} names a mesh axis twice: {"+".join(axes)}.')
    table[name] = target
  return tuple(table.items())


# --------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, sequence: int = 1,
              expert: int = 1, stage: int = 1, dcn_data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all devices with Auto axes; one axis may be -1 (the rest).

  Raises ConfigError (naming the axes and the numbers) when the sizes do not multiply
  to the device count. ``dcn_data > 1`` splits the data axis as ``dcn_data`` slices
  (TPU slices, or processes where devices have no ``slice_index``) x devices within a
  slice, so only the data-parallel gradient reduction crosses the slow network.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  shape = {'data': data, 'stage': stage, 'fsdp': fsdp, 'sequence': sequence,
           'tensor': tensor, 'expert': expert}
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    raise _config_error(f'mesh: only one axis may be -1, got {shape}; set mesh.{free[1]} to a number.')
  for k, v in shape.items():
    if v == 0 or v < -1:
      raise _config_error(f'mesh.{k} must be a positive int or -1, got {v}.')
  fixed = math.prod(v for v in shape.values() if v != -1)
  if free:
    if n % fixed:
      named = '*'.join(f'{k}={v}' for k, v in shape.items() if v != -1 and (v > 1 or k != 'expert'))
      raise _config_error(
          f'mesh: {n} devices are not divisible by the fixed axes {named} '
          f'(product {fixed}) so mesh.{free[0]}=-1 cannot take the rest; make the '
          f'fixed axes divide {n}.')
    shape[free[0]] = n // fixed
  total = math.prod(shape.values())
  if total != n:
    shown = {k: v for k, v in shape.items() if k in ('data', 'fsdp', 'tensor') or v != 1}
    raise _config_error(
        f'mesh: {"*".join(shown)} = {"*".join(map(str, shown.values()))} = {total} but '
        f'there are {n} devices; set one axis to -1 or make the product {n}.')
  sizes = tuple(shape[a] for a in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if dcn_data == 1:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
  return jax.sharding.Mesh(hybrid_device_array(sizes, dcn_data, devices), MESH_AXES,
                           axis_types=axis_types)


def dcn_granules(devices: Sequence[Any], dcn_data: int) -> tuple[bool, set[int]]:
  """What the slow network joins: (by slice?, the set of slice or process indices).

  Multi-slice TPU devices carry distinct ``slice_index`` values. Devices without
  slice information (GPU, multi-process CPU) report ``slice_index`` 0 for every
  device, or none: there the processes (hosts) are the granules that the data axis
  spans, so ``dcn_data`` = number of processes lays one data shard group per host.
  """
  slices = {getattr(d, 'slice_index', None) for d in devices}
  if None not in slices and (len(slices) > 1 or dcn_data == 1):
    return True, slices
  return False, {d.process_index for d in devices}


def hybrid_device_array(sizes: Sequence[int], dcn_data: int, devices: Sequence[Any]
                        ) -> np.ndarray:
  """Devices as an array of ``sizes`` whose data axis spans ``dcn_data`` granules."""
  if sizes[0] % dcn_data:
    raise _config_error(
        f'mesh.dcn_data={dcn_data} does not divide mesh.data={sizes[0]}; the data axis is '
        f'laid out as dcn_data slices x (data/dcn_data) devices per slice.')
  by_slice, granules = dcn_granules(devices, dcn_data)
  if len(granules) != dcn_data:
    unit = 'slices' if by_slice else 'processes'
    raise _config_error(
        f'mesh.dcn_data={dcn_data} but the {len(devices)} devices form {len(granules)} '
        f'{unit}; set mesh.dcn_data={len(granules)} (or 1).')
  from jax.experimental import mesh_utils
  ici = (sizes[0] // dcn_data,) + tuple(sizes[1:])
  dcn = (dcn_data,) + (1,) * (len(sizes) - 1)
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices),
                                              process_is_granule=not by_slice)


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None
                     ) -> jax.sharding.Mesh:
  """The mesh a config's ``mesh`` section describes, over ``devices`` (default all)."""
  validate_mesh_config(mesh_cfg)
  return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, sequence=mesh_cfg.sequence,
                   expert=mesh_cfg.expert, stage=mesh_cfg.get('stage', 1),
                   dcn_data=mesh_cfg.dcn_data, devices=devices)


# --------------------------------------------------------------------------- rules


def batch_shards(mesh_shape: dict[str, int]) -> int:
  """How many ways the default rules split the batch: the product of the mesh axes the
  ``'batch'`` row maps to (data, FSDP and expert; size-1 or absent axes count 1)."""
  target = dict(DEFAULT_RULES)['batch']
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return math.prod(mesh_shape.get(a, 1) for a in axes)


def logical_to_mesh_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """``('batch', 'seq')`` -> ``P(('data', 'fsdp'), 'sequence')``."""
  table = dict(rules)
  out, used = [], {}
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no sharding rule; add it to the rules.')
    target = table[name]
    for a in (target,) if isinstance(target, str) else (target or ()):
      if a in used:
        raise _config_error(
            f'logical axes {used[a]!r} and {name!r} of one array both map to mesh axis '
            f'{a!r}; change mesh.rules so each mesh axis is used once per array.')
      used[a] = name
    out.append(target)
  return P(*out)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """Makes ``mesh`` and the logical rules current (for init, constraints, the step)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - only DuplicateSpecError is translated.
      # Flax builds a NamedSharding per annotated parameter from the rules; two of its
      # logical axes mapped to one mesh axis fail there, with JAX's own wording.
      if type(e).__name__ != 'DuplicateSpecError':
        raise
      import re
      spec = re.search(r"(P\(.*?\)) has duplicate entries for `(\w+)`", str(e))
      what = f'{spec.group(1)} uses mesh axis {spec.group(2)!r} twice' if spec else str(e)[:200]
      raise _config_error(
          f'mesh.rules map two logical axes of one array to the same mesh axis: {what}; '
          f'change mesh.rules so each mesh axis is used once per array.') from None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op when no mesh/rules are active."""
  rules = spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(names, rules))


def named(mesh: jax.sharding.Mesh, names: Sequence[str | None], rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh_spec(names, rules))


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a Variable was annotated with (``with_partitioning``)."""
  meta = variable.get_metadata()
  names = meta.get('out_sharding', meta.get('sharding_names', meta.get('sharding')))
  return tuple(names) if names is not None else None


def _path_str(path) -> str:
  parts = []
  for k in path:
    k = getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))
    if k in ('value', 'raw_value'):
      continue
    parts.append(str(k))
  return '/'.join(parts)


def _axis_config_name(axis: str) -> str:
  return f'mesh.{axis}'


def check_shardable(path: str, shape: Sequence[int], names: Sequence[str | None],
                    spec: P, mesh: jax.sharding.Mesh) -> None:
  """Every dimension divides by the product of the mesh axes it is split over."""
  for dim, (size, name, target) in enumerate(zip(shape, names, spec)):
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    if ways > 1 and size % ways:
      what = '*'.join(f'{_axis_config_name(a)}={mesh.shape[a]}' for a in axes)
      raise _config_error(
          f'{what} does not divide dimension {dim} ({name!r}, size {size}) of {path} '
          f'{list(shape)}; choose mesh sizes that divide it (or change mesh.rules).')


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an NNX state, from each Variable's logical axis names.

  Unannotated variables (RNG keys, step counters) are replicated. Raises ConfigError
  (naming the parameter, the mesh axis and the sizes) when a dimension does not divide
  by the mesh axes it would be split over, before anything is compiled.
  """
  def to_sharding(path, v):
    names = logical_names(v) if isinstance(v, nnx.Variable) else None
    spec = logical_to_mesh_spec(names, rules) if names else P()
    if names:
      value = v.get_value() if isinstance(v, nnx.Variable) else v
      shape = getattr(value, 'shape', None)
      if shape is not None and len(shape) == len(names):
        check_shardable(_path_str(path), shape, names, spec, mesh)
    return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      to_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (max shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = tuple(x.shape)
    sharding = getattr(x, 'sharding', None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total
