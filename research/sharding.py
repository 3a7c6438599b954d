"""Device mesh, logical-axis rules and activation sharding constraints.

Models name only logical axes (``'batch'``, ``'embed'``, ``'heads'``...). This module
maps them to the mesh axes ``('data', 'fsdp', 'tensor')`` through a rules table, the
way MaxText does. Parameter names and activation names differ (``'embed'`` for a
weight dimension is FSDP-sharded; ``'act_embed'`` of an activation is not).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Every logical name used by a model must appear here.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations.
    ('batch', ('data', 'fsdp')),
    ('seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_kv', None),
    # Parameters.
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),  # head_dim
    ('mlp', 'tensor'),
    ('norm', None),
    ('pos', None),  # Learned absolute-position table rows.
    ('classes', None),
    ('lora_rank', None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all devices; one axis may be -1 (all remaining devices)."""
  from research.config import ConfigError  # Local: avoid an import cycle.
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  shape = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f'mesh: only one axis may be -1, got {shape}; set mesh.{free[1]} to a number.')
  for k, v in shape.items():
    if v == 0 or v < -1:
      raise ConfigError(f'mesh.{k} must be a positive int or -1, got {v}.')
  fixed = 1
  for k, v in shape.items():
    if v != -1:
      fixed *= v
  if free:
    if n % fixed:
      raise ConfigError(
          f'mesh: {n} devices are not divisible by the fixed axes {shape} '
          f'(product {fixed}); change mesh.* so they divide {n}.')
    shape[free[0]] = n // fixed
  total = shape['data'] * shape['fsdp'] * shape['tensor']
  if total != n:
    raise ConfigError(
        f'mesh: data*fsdp*tensor = {shape["data"]}*{shape["fsdp"]}*{shape["tensor"]} = '
        f'{total} but there are {n} devices; set one axis to -1 or make the product {n}.')
  return jax.make_mesh(
      tuple(shape[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """``('batch', 'seq')`` -> ``P(('data', 'fsdp'), None)``."""
  table = dict(rules)
  out = []
  for name in names:
    if name is None:
      out.append(None)
    elif name not in table:
      raise KeyError(f'logical axis {name!r} has no sharding rule; add it to the rules.')
    else:
      out.append(table[name])
  return P(*out)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """Makes ``mesh`` and the logical rules current (for init, constraints, the step)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


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


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an NNX state, from each Variable's logical axis names.

  Unannotated variables (RNG keys, step counters) are replicated.
  """
  def to_sharding(v):
    names = logical_names(v) if isinstance(v, nnx.Variable) else None
    spec = logical_to_mesh_spec(names, rules) if names else P()
    return v.replace(NamedSharding(mesh, spec)) if isinstance(v, nnx.Variable) else NamedSharding(mesh, spec)

  return jax.tree.map(to_sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
