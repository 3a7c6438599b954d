"""Batch-size ramp: the global batch grows during training (GPT-3 style).

Config (``batch_ramp.*``, declared in research/config.py)::

  boundaries  = (b_1, ..., b_n)   steps after which the batch changes (increasing)
  batch_sizes = (s_1, ..., s_n)   the global batch before each boundary
  lr_scaling  = 'none' | 'linear' | 'sqrt'

Steps ``1..b_1`` use ``s_1`` sequences, steps ``b_1+1..b_2`` use ``s_2``, ..., and every
step after ``b_n`` uses ``batch_size`` (the final, nominal global batch). Empty tuples:
no ramp. The learning rate at a step is the schedule's value times
``(b / batch_size) ** p`` with ``p`` = 0, 1 or 1/2 for none, linear and sqrt: the LR
is declared for the *final* batch, and smaller batches early on get a proportionally
(linear, Goyal et al. 2017) or square-root (Krizhevsky 2014, Malladi et al. 2022 for
Adam) smaller one.

Data: the train iterator yields *unit* batches of ``gcd(all sizes)`` sequences and the
batch of step ``s`` concatenates ``size(s) / unit`` of them. The token stream is
therefore the same as without a ramp (the windows arrive in the same order, only
grouped differently), and the iterator's checkpointed position plus the step decide
every later batch, so a resume across a boundary is exact. Without a ramp the unit is
``batch_size`` and nothing changes.

Compilation: the jitted train step sees a new batch shape at each boundary and traces
once per distinct size (jit's cache is keyed by shape); ``grad_accum_steps`` splits
every size into that many micro-batches, so the largest micro-batch (the memory peak)
is the final batch's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import ml_collections
import numpy as np

from research.config import ConfigError

LR_SCALINGS = {'none': 0.0, 'linear': 1.0, 'sqrt': 0.5}


@dataclasses.dataclass(frozen=True)
class BatchRamp:
  """The global batch size of every step and the LR factor that goes with it."""
  boundaries: tuple[int, ...]
  sizes: tuple[int, ...]  # len(boundaries) + 1; the last is config.batch_size.
  lr_scaling: str = 'none'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'BatchRamp':
    r = config.batch_ramp
    return cls(tuple(int(b) for b in r.boundaries),
               tuple(int(s) for s in r.batch_sizes) + (int(config.batch_size),),
               r.lr_scaling)

  @property
  def active(self) -> bool:
    return bool(self.boundaries)

  @property
  def final(self) -> int:
    return self.sizes[-1]

  @property
  def unit(self) -> int:
    """Sequences per iterator batch: the gcd of every size (``batch_size`` if no ramp)."""
    return math.gcd(*self.sizes)

  def stage(self, step: int) -> int:
    """Index into ``sizes`` of 1-based ``step``."""
    return sum(step > b for b in self.boundaries)

  def batch_size(self, step: int) -> int:
    """The global batch (sequences) of 1-based ``step``."""
    return self.sizes[self.stage(step)]

  def tokens_through(self, step: int, seq_len: int) -> int:
    """Tokens (batch x seq_len, padding included) of steps ``1..step``."""
    total, prev = 0, 0
    for b, size in zip(self.boundaries + (max(step, 0),), self.sizes):
      n = min(b, step) - prev
      if n <= 0:
        break
      total += n * size
      prev = min(b, step)
    return total * seq_len

  def new_size_in(self, first: int, last: int) -> bool:
    """Whether a step in ``first..last`` is the first of a new batch size (a compile)."""
    return any(first <= b + 1 <= last for b in self.boundaries)

  def lr_factors(self) -> tuple[float, ...]:
    p = LR_SCALINGS[self.lr_scaling]
    return tuple((s / self.final) ** p for s in self.sizes)

  def lr_factor(self) -> Any:
    """``count -> factor`` (count = optimizer updates so far = step - 1); None if 1."""
    if not self.active or self.lr_scaling == 'none':
      return None
    import jax.numpy as jnp  # Late: keeps the module importable without jax work.
    bounds = np.asarray(self.boundaries, np.int32)
    factors = np.asarray(self.lr_factors(), np.float32)

    def factor(count):
      stage = jnp.sum(jnp.asarray(count)[..., None] >= bounds, axis=-1)
      return jnp.asarray(factors)[stage]

    return factor

  def next_batch(self, iterator: Iterator[dict[str, np.ndarray]], step: int
                 ) -> dict[str, np.ndarray]:
    """This process's batch of ``step``: ``batch_size(step) / unit`` unit batches."""
    n = self.batch_size(step) // self.unit
    if n == 1:
      return next(iterator)
    parts = [next(iterator) for _ in range(n)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def describe(self) -> str:
    spans, prev = [], 0
    for b, size in zip(self.boundaries, self.sizes):
      spans.append(f'steps {prev + 1}-{b}: {size}')
      prev = b
    spans.append(f'steps {prev + 1}-: {self.final}')
    return '; '.join(spans) + f' (lr_scaling={self.lr_scaling})'


def lr_factor(config: ml_collections.ConfigDict):
  """The LR multiplier schedule of ``config``'s ramp, or None (no ramp / no scaling)."""
  return BatchRamp.from_config(config).lr_factor()


def validate(config: ml_collections.ConfigDict, mesh_shape: dict[str, int] | None = None,
             process_count: int = 1) -> BatchRamp:
  """Checks ``batch_ramp.*`` (and each size against the mesh); returns the ramp."""
  r = config.batch_ramp
  if r.lr_scaling not in LR_SCALINGS:
    raise ConfigError(f'batch_ramp.lr_scaling={r.lr_scaling!r} is unknown; use one of '
                      f'{tuple(LR_SCALINGS)}.')
  bounds, sizes = tuple(r.boundaries), tuple(r.batch_sizes)
  if len(bounds) != len(sizes):
    raise ConfigError(
        f'batch_ramp.boundaries has {len(bounds)} entries but batch_ramp.batch_sizes has '
        f'{len(sizes)}; give one size per boundary (the batch before it).')
  for key, vals in (('boundaries', bounds), ('batch_sizes', sizes)):
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
               for v in vals):
      raise ConfigError(f'batch_ramp.{key}={vals!r} must be positive integers.')
  if any(b >= a for b, a in zip(bounds, bounds[1:])) or (bounds and bounds[-1] >= config.steps):
    raise ConfigError(
        f'batch_ramp.boundaries={bounds!r} must increase strictly and stay below '
        f'steps={config.steps}; use steps after which the batch changes.')
  ramp = BatchRamp.from_config(config)
  if mesh_shape is not None and ramp.active:
    from research.sharding import batch_shards  # Imports JAX: only with a mesh shape.
    shards = batch_shards(mesh_shape)
    k = config.optimizer.grad_accum_steps
    need = math.lcm(k * shards, process_count)
    for s in ramp.sizes[:-1]:
      if s % need:
        raise ConfigError(
            f'batch_ramp.batch_sizes has {s}, which does not split into '
            f'optimizer.grad_accum_steps={k} micro-batches over {shards} data shards and '
            f'{process_count} processes; use multiples of {need}.')
  return ramp


def linear_ramp(start: int, final: int, ramp_steps: int, stages: int,
                multiple_of: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """GPT-3-style ramp helper: ``stages`` equal spans over the first ``ramp_steps``.

  Returns ``(boundaries, batch_sizes)`` for ``batch_ramp.*``: the sizes grow linearly
  from ``start`` towards ``final`` (exclusive), each rounded down to ``multiple_of``.
  """
  bounds, sizes = [], []
  for i in range(stages):
    size = start + (final - start) * i // stages
    size = max(multiple_of, size // multiple_of * multiple_of)
    bounds.append(ramp_steps * (i + 1) // stages)
    sizes.append(size)
  return tuple(bounds), tuple(sizes)
