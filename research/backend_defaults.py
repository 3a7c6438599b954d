"""Execution choices made by backend: how a config's step runs, never what it computes.

A config describes a model and its training; some settings only decide how XLA runs
that update, and the fast choice differs by backend. Rather than a CPU-only variant of
each config, the run resolves them here, from the backend it is about to run on, so the
config a user runs is the fast one everywhere (``backend_defaults=True``, the default;
``False`` runs ``model.*``/``optimizer.*`` exactly as written):

* CPU, plain pretraining only (QAT intercepts the forward ``dot_general`` and needs
  autodiff's backward; the fine-tuning/distillation/pruning wrappers are left as
  written, none has been measured with these choices):

  - ``model.projection_vjp='transpose_input'`` (research/models/projection.py): the
    same gradients up to float reassociation; XLA:CPU otherwise lays the
    weight-gradient dots out by transposing the big side (README "Benchmarking").
  - ``model.scan_unroll=0``: the scanned layer stack runs as straight-line code over
    the same stacked parameters (XLA:CPU otherwise copies each layer's residuals into
    and out of stacked buffers); the parameter tree and checkpoints are unchanged.
  - one CPU device per core (:func:`set_cpu_devices`, before JAX starts; a single
    process, the default mesh, ``model.d_model <= CPU_DEVICES_MAX_D_MODEL``): the
    batch is split over the cores as data parallelism instead of every small op being
    split over threads (the update is the same up to the order of the gradient sum).
  - ``optimizer.grad_accum_steps``: with at most one device per core, a batch of more
    than :data:`CPU_MICRO_BATCH_TOKENS` tokens is split into micro-batches of about
    that many tokens in all (activations that stay in cache). Gradient accumulation
    here is exact (token-weighted), so the update is the same up to float rounding;
    not with a batch ramp or an explicit ``grad_accum_steps``.
* GPU/TPU: nothing changes.

``model.scan_layers`` itself is deliberately not switched: it changes the parameter
tree (``blocks/...`` stacked vs ``blocks/<i>/...``), so a checkpoint written on one
backend would not restore on another. ``recipe.run`` and ``launch.benchmark`` both
call :func:`apply`, so the benchmark always runs the step training runs, and the
resolved config is what ``config.json`` records.

The persistent compilation cache, the other start-up choice, is
:mod:`research.compile_cache` (set up by every entry point before JAX is imported).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

# Tokens per micro-batch, in all over the process's CPU devices; on one device the
# fastest of 1..32 micro-batches of the small config (8,192 tokens per step) was 8 of
# 4 x 256 tokens, and with one device per core two devices x 512 tokens beat 2 x 1,024
# (README "Benchmarking").
CPU_MICRO_BATCH_TOKENS = 1024

# The XLA flag that fixes the number of CPU devices (tests, launch.local, launch.plan).
CPU_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'

# One CPU device per core was measured faster for d_model 128 (1.3-1.5x), 256 (1.14x)
# and 384 (1.05x) on 2 cores and not measured wider, where the ops are big enough for
# XLA's threads and every device would hold its own copy of the parameters.
CPU_DEVICES_MAX_D_MODEL = 384


# model.* keys that apply() may set: how the model's computation is laid out, not its
# parameters. A run's config.json records the resolved values; a consumer that rebuilds
# the same model next to load_run_model's (PTQ's integer model) takes them from the run.
MODEL_EXECUTION_KEYS = ('projection_vjp', 'scan_unroll')


def cpu_micro_batches(batch_size: int, seq_len: int, devices: int = 1) -> int:
  """The most micro-batches that keep at least CPU_MICRO_BATCH_TOKENS tokens each (in
  all, over ``devices``), each one dividing over the devices."""
  best = 1
  for k in range(1, batch_size + 1):
    if (batch_size % k == 0 and (batch_size // k) % devices == 0
        and batch_size // k * seq_len >= CPU_MICRO_BATCH_TOKENS):
      best = k
  return best


def usable_cores() -> int:
  return len(os.sched_getaffinity(0))


def xla_flags_with_cpu_devices(xla_flags: str, devices: int | None) -> str:
  """``xla_flags`` with its CPU device count replaced by ``devices`` (``None``: removed,
  so the process chooses its own); every other flag kept in order."""
  kept = [f for f in xla_flags.split() if not f.startswith(CPU_DEVICE_COUNT_FLAG)]
  return ' '.join(kept + ([f'{CPU_DEVICE_COUNT_FLAG}={devices}'] if devices else []))


def cpu_device_count(config: ml_collections.ConfigDict, cores: int) -> int:
  """How many CPU devices a one-process CPU run of ``config`` is split over: one per
  core (the most that divide the batch) when the backend defaults apply, the mesh is
  the default (data over all devices) and the model is narrow; else 1."""
  from research.feature_validation import active_features
  from research.sharding import MESH_AXES
  m = config.mesh
  default_mesh = (m.data == -1 and m.get('dcn_data', 1) == 1 and all(
      m.get(axis, 1) == 1 for axis in MESH_AXES if axis != 'data'))
  if (not config.get('backend_defaults', False) or active_features(config)
      or not default_mesh or config.model.d_model > CPU_DEVICES_MAX_D_MODEL
      or config.batch_ramp.boundaries):
    return 1
  n = max(1, cores)
  while n > 1 and config.batch_size % n:
    n -= 1
  return n


def set_cpu_devices(config: ml_collections.ConfigDict) -> int:
  """Gives JAX's CPU backend :func:`cpu_device_count` devices; call before anything
  starts JAX's backends, in a single-process run. Left alone (returns 0) when the count
  is already chosen (``--xla_force_host_platform_device_count``, ``jax_num_cpu_devices``),
  JAX_PLATFORMS names no CPU first, or the backends are up. On GPU/TPU the CPU devices
  go unused, so nothing changes there."""
  import jax
  from jax._src import xla_bridge
  platforms = os.environ.get('JAX_PLATFORMS', '') or (jax.config.jax_platforms or '')
  if (CPU_DEVICE_COUNT_FLAG in os.environ.get('XLA_FLAGS', '')
      or jax.config.jax_num_cpu_devices != -1 or xla_bridge.backends_are_initialized()
      or (platforms and platforms.split(',')[0] != 'cpu')):
    return 0
  n = cpu_device_count(config, usable_cores())
  if n > 1:
    jax.config.update('jax_num_cpu_devices', n)
  return n


def overrides(config: ml_collections.ConfigDict, backend: str,
              device_count: int = 1, cores: int | None = None) -> dict[str, Any]:
  """The dotted-key changes :func:`apply` makes to ``config`` on ``backend``."""
  from research.feature_validation import active_features
  if not config.get('backend_defaults', False) or backend != 'cpu' or active_features(config):
    return {}
  out: dict[str, Any] = {}
  if config.model.projection_vjp == 'autodiff':
    out['model.projection_vjp'] = 'transpose_input'
  if config.model.scan_layers and config.model.scan_unroll == 1:
    out['model.scan_unroll'] = 0
  cores = usable_cores() if cores is None else cores
  if (device_count <= max(1, cores) and config.optimizer.grad_accum_steps == 1
      and not config.batch_ramp.boundaries):
    k = cpu_micro_batches(config.batch_size, config.seq_len, device_count)
    if k > 1:
      out['optimizer.grad_accum_steps'] = k
  return out


def apply(config: ml_collections.ConfigDict, backend: str | None = None,
          device_count: int | None = None) -> dict[str, Any]:
  """Applies :func:`overrides` in place (default: JAX's backend and device count)."""
  if backend is None or device_count is None:
    import jax
    backend = jax.default_backend() if backend is None else backend
    device_count = jax.device_count() if device_count is None else device_count
  changes = overrides(config, backend, device_count)
  if changes:
    from research.config import override
    override(config, changes)
  return changes
