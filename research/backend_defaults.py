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
  - ``optimizer.grad_accum_steps``: on one device, a batch of more than
    :data:`CPU_MICRO_BATCH_TOKENS` tokens is split into micro-batches of about that
    many tokens (activations that stay in cache). Gradient accumulation here is exact
    (token-weighted), so the update is the same up to float rounding; not with a batch
    ramp or an explicit ``grad_accum_steps``.
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

from typing import Any

import ml_collections

# Tokens per micro-batch on one CPU device; the fastest of 1..32 micro-batches of the
# small config (8,192 tokens per step): 8 micro-batches of 4 x 256 tokens (README
# "Benchmarking").
CPU_MICRO_BATCH_TOKENS = 1024


# model.* keys that apply() may set: how the model's computation is laid out, not its
# parameters. A run's config.json records the resolved values; a consumer that rebuilds
# the same model next to load_run_model's (PTQ's integer model) takes them from the run.
MODEL_EXECUTION_KEYS = ('projection_vjp', 'scan_unroll')


def cpu_micro_batches(batch_size: int, seq_len: int) -> int:
  """The most micro-batches that keep at least CPU_MICRO_BATCH_TOKENS tokens each."""
  best = 1
  for k in range(1, batch_size + 1):
    if batch_size % k == 0 and batch_size // k * seq_len >= CPU_MICRO_BATCH_TOKENS:
      best = k
  return best


def overrides(config: ml_collections.ConfigDict, backend: str,
              device_count: int = 1) -> dict[str, Any]:
  """The dotted-key changes :func:`apply` makes to ``config`` on ``backend``."""
  from research.feature_validation import active_features
  if not config.get('backend_defaults', False) or backend != 'cpu' or active_features(config):
    return {}
  out: dict[str, Any] = {}
  if config.model.projection_vjp == 'autodiff':
    out['model.projection_vjp'] = 'transpose_input'
  if config.model.scan_layers and config.model.scan_unroll == 1:
    out['model.scan_unroll'] = 0
  if (device_count == 1 and config.optimizer.grad_accum_steps == 1
      and not config.batch_ramp.boundaries):
    k = cpu_micro_batches(config.batch_size, config.seq_len)
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
