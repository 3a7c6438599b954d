"""Optimizers, learning-rate schedules and regex parameter rules (Optax).

Parameter rules follow big_vision: regexes over the '/'-joined parameter path (e.g.
``blocks/attn/query/kernel``) decide weight decay, learning-rate multipliers and
freezing. Schedules all start with a linear warmup and are built from Optax
combinators, so their values are the closed forms in the docstrings.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research.config import ConfigError

SCHEDULES = ('cosine', 'constant', 'linear', 'inverse_sqrt', 'wsd')
OPTIMIZERS = ('adamw', 'adafactor', 'lion', 'sgd', 'muon')
WSD_SHAPES = ('linear', 'cosine', 'sqrt')


def path_str(path: tuple[Any, ...]) -> str:
  """A pytree key path as ``'a/b/c'`` (works for dicts, attrs, NNX states)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def regex_mask(params, pattern: str, *, match: bool) -> Any:
  """A pytree of bools: ``re.search(pattern, path) == match`` for every leaf."""
  rx = re.compile(pattern) if pattern else None

  def leaf(path, _):
    hit = bool(rx.search(path_str(path))) if rx else False
    return hit == match

  return jax.tree_util.tree_map_with_path(leaf, params)


def _warmup(peak: float, warmup: int) -> optax.Schedule:
  return optax.linear_schedule(0.0, peak, max(warmup, 1))


def _wsd_decay(peak: float, floor: float, n: int, shape: str) -> optax.Schedule:
  """Decay from peak to floor over n steps; shape of the fraction done t in [0, 1]."""
  def fn(count):
    t = jnp.clip(count / max(n, 1), 0.0, 1.0)
    if shape == 'linear':
      frac = 1.0 - t
    elif shape == 'cosine':
      frac = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    else:  # 'sqrt': 1 - sqrt(t) (Hägele et al. 2024 find it best).
      frac = 1.0 - jnp.sqrt(t)
    return floor + (peak - floor) * frac
  return fn


def make_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then:

  * cosine: cosine decay to ``min_lr_ratio * peak`` at ``decay_steps`` (0: total).
  * constant: the peak.
  * linear: linear decay to the floor at ``decay_steps``.
  * inverse_sqrt: ``peak * sqrt(warmup / step)`` after warmup.
  * wsd: the peak until the last ``wsd_decay_fraction`` of the run, then a decay of
    ``wsd_decay_shape`` to the floor (warmup-stable-decay).
  """
  peak = o.learning_rate
  warmup = min(o.warmup_steps, total_steps)
  end = o.decay_steps or total_steps
  floor = peak * o.min_lr_ratio
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(end, warmup + 1), end_value=floor)
  if o.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif o.schedule == 'linear':
    after = optax.linear_schedule(peak, floor, max(end - warmup, 1))
  elif o.schedule == 'inverse_sqrt':
    w = max(warmup, 1)
    after = lambda count: peak * jnp.sqrt(w / (count + w))
  elif o.schedule == 'wsd':
    decay_len = int(round(o.wsd_decay_fraction * end))
    stable_len = max(end - warmup - decay_len, 0)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), _wsd_decay(peak, floor, decay_len, o.wsd_decay_shape)],
        [stable_len])
  else:
    raise ConfigError(f'optimizer.schedule={o.schedule!r} is unknown; use one of {SCHEDULES}.')
  return optax.join_schedules([_warmup(peak, warmup), after], [warmup])


# Muon: which weight axes form the matrix (reduction = input, output); every other
# axis (the stacked 'layers' axis of scanned blocks) is a batch axis. First match wins.
# Paths not listed (embedding, head, norms, biases, LoRA factors...) use Adam.
MUON_RULES = (
    (r'attn/(query|key|value)/kernel', (-3,), (-2, -1)),  # [.., d, heads, head_dim]
    (r'attn/out/kernel', (-3, -2), (-1,)),  # [.., heads, head_dim, d]
    (r'(embed|head|norm|lora)', None, None),
    (r'kernel', (-2,), (-1,)),  # Dense [.., in, out] (MLP).
)


def muon_dimension_numbers(params) -> Any:
  """A tree of ``MuonDimensionNumbers`` (None = Adam) by :data:`MUON_RULES`.

  optax's default applies Muon to every 2-D array, which here would mean the
  embedding and the stacked norm scales [layers, d], while the real matrices (3-D and
  4-D with scanned layers and per-head projections) would all fall to Adam.
  """
  rules = [(re.compile(rx), red, out) for rx, red, out in MUON_RULES]

  def leaf(path, x):
    p = path_str(path)
    for rx, red, out in rules:
      if rx.search(p):
        if red is None or np.ndim(x) < len(red) + len(out):
          return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=red, output_axis=out)
    return None

  return jax.tree_util.tree_map_with_path(leaf, params)


def _base_optimizer(o, schedule, decay_mask) -> optax.GradientTransformation:
  if o.name == 'adamw':
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay, mask=decay_mask)
  if o.name == 'lion':
    return optax.lion(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                      mask=decay_mask)
  if o.name == 'adafactor':
    return optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None,
                           weight_decay_mask=decay_mask)
  if o.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=o.momentum or None, nesterov=False))
  if o.name == 'muon':
    # Muon orthogonalises the weight matrices (muon_dimension_numbers); embeddings,
    # the output head, norms and biases use Adam (as in Jordan et al. 2024) and get no
    # weight decay (optax applies Adam's decay unmasked, so it stays 0).
    return optax.contrib.muon(schedule, beta=o.b1 if o.b1 > 0 else 0.95,
                              weight_decay=o.weight_decay, weight_decay_mask=decay_mask,
                              adam_b1=o.b1, adam_b2=o.b2,
                              muon_weight_dimension_numbers=muon_dimension_numbers)
  raise ConfigError(f'optimizer.name={o.name!r} is unknown; use one of {OPTIMIZERS}.')


def _lr_multipliers(rules) -> optax.GradientTransformation:
  """Scales each update by the multiplier of the first regex matching its path."""
  compiled = [(re.compile(rx), float(mult)) for rx, mult in rules]

  def mult_tree(params):
    def leaf(path, _):
      p = path_str(path)
      for rx, mult in compiled:
        if rx.search(p):
          return mult
      return 1.0
    return jax.tree_util.tree_map_with_path(leaf, params)

  def update(updates, state, params=None):
    mults = mult_tree(updates)
    return jax.tree.map(lambda u, m: u * m, updates, mults), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_schedule(schedule: optax.Schedule, factor: optax.Schedule | None
                   ) -> optax.Schedule:
  """``count -> schedule(count) * factor(count)`` (e.g. a batch ramp's LR scaling)."""
  if factor is None:
    return schedule
  return lambda count: schedule(count) * factor(count)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int,
                   lr_factor: optax.Schedule | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip -> optimizer (masked decay) -> LR multipliers, with frozen params masked off.

  Frozen parameters go through ``optax.set_to_zero`` inside ``multi_transform``, which
  keeps no optimizer state for them. ``lr_factor(count)`` multiplies the schedule
  (research/batch_ramp.py: the LR scaling of the batch in effect at that step); the
  returned schedule includes it.
  """
  schedule = scale_schedule(make_schedule(o, total_steps), lr_factor)
  decay_mask = lambda params: regex_mask(params, o.no_decay_regex, match=False)
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(_base_optimizer(o, schedule, decay_mask))
  if o.lr_multipliers:
    parts.append(_lr_multipliers(o.lr_multipliers))
  tx = optax.chain(*parts)
  if o.frozen_regex:
    labels = lambda params: jax.tree.map(
        lambda frozen: 'frozen' if frozen else 'train',
        regex_mask(params, o.frozen_regex, match=True))
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def validate_optimizer_config(o: ml_collections.ConfigDict) -> None:
  if o.name not in OPTIMIZERS:
    raise ConfigError(f'optimizer.name={o.name!r} is unknown; use one of {OPTIMIZERS}.')
  if o.schedule not in SCHEDULES:
    raise ConfigError(f'optimizer.schedule={o.schedule!r} is unknown; use one of {SCHEDULES}.')
  if o.wsd_decay_shape not in WSD_SHAPES:
    raise ConfigError(
        f'optimizer.wsd_decay_shape={o.wsd_decay_shape!r} is unknown; use one of {WSD_SHAPES}.')
  if not 0.0 <= o.wsd_decay_fraction <= 1.0:
    raise ConfigError(
        f'optimizer.wsd_decay_fraction must be in [0, 1], got {o.wsd_decay_fraction}.')
  if o.learning_rate <= 0:
    raise ConfigError(f'optimizer.learning_rate must be > 0, got {o.learning_rate}.')
  if o.grad_accum_steps < 1:
    raise ConfigError(f'optimizer.grad_accum_steps must be >= 1, got {o.grad_accum_steps}.')
  for key in ('no_decay_regex', 'frozen_regex'):
    try:
      re.compile(o[key])
    except re.error as e:
      raise ConfigError(f'optimizer.{key} is not a valid regex: {e}.') from None
  for rule in o.lr_multipliers:
    if len(rule) != 2:
      raise ConfigError(
          f'optimizer.lr_multipliers entries are (regex, multiplier) pairs, got {rule!r}.')


def run_schedule(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Per step (1..steps) of a run: the learning rate, global batch and tokens seen.

  Exactly what the trainer uses: ``make_optimizer``'s schedule (with the batch ramp's
  LR scaling) evaluated at count = step - 1, and the ramp's batch size of each step.
  """
  from research import batch_ramp  # Late: batch_ramp imports nothing from here.
  ramp = batch_ramp.BatchRamp.from_config(config)
  schedule = scale_schedule(make_schedule(config.optimizer, config.steps), ramp.lr_factor())
  steps = np.arange(1, config.steps + 1)
  lr = np.asarray(jax.device_get(schedule(jnp.arange(config.steps))), np.float64)
  batch = np.array([ramp.batch_size(int(s)) for s in steps])
  return {'step': steps, 'learning_rate': lr, 'batch_size': batch,
          'tokens_seen': np.cumsum(batch) * config.seq_len}
