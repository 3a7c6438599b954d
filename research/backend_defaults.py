"""Execution choices made by backend: how a config's step runs, never what it computes.

A config describes a model and its training; some settings only decide how XLA runs
that update, and the fast choice differs by backend. Rather than a CPU-only variant
of each config (``small.py:cpu=True``), the run resolves them here, from the backend
it is about to run on, so the config a user runs is the fast one everywhere:

* CPU: ``model.projection_vjp='transpose_input'`` (research/models/projection.py): the
  same gradients up to float reassociation, the same parameters and checkpoints;
  XLA:CPU otherwise lays the weight-gradient dots out by transposing the big side.
  Only for plain pretraining: QAT intercepts the forward ``dot_general`` and needs
  autodiff's backward, and fine-tuning/distillation/pruning wrappers are left as
  written (none has been measured with it).
* GPU/TPU: nothing changes.

``model.scan_layers`` is deliberately not switched: it changes the parameter tree
(``blocks/...`` stacked vs ``blocks/<i>/...``), so a checkpoint written on one backend
would not restore on another.

Opt-in for now (``backend_defaults=True``; default False runs ``model.*`` as written):
switched on, the float-rounding differences of the plain run carry into runs built on
it, and QAT fine-tuning from such a base moves ``tests/test_recipe.py``'s
``qat_finetune`` golden losses by 7e-5 relative (the tolerance there is 1e-5); making it
the default means re-recording those goldens. ``recipe.run`` and ``launch.benchmark``
both call :func:`apply`, so the benchmark always runs the step training runs.

The persistent compilation cache, the other start-up choice, is
:mod:`research.compile_cache` (set up by every entry point before JAX is imported).
"""

from __future__ import annotations

from typing import Any

import ml_collections

def overrides(config: ml_collections.ConfigDict, backend: str) -> dict[str, Any]:
  """The dotted-key changes :func:`apply` makes to ``config`` on ``backend``."""
  from research.feature_validation import active_features
  if not config.get('backend_defaults', False) or backend != 'cpu':
    return {}
  out: dict[str, Any] = {}
  if config.model.projection_vjp == 'autodiff' and not active_features(config):
    out['model.projection_vjp'] = 'transpose_input'
  return out


def apply(config: ml_collections.ConfigDict, backend: str | None = None) -> dict[str, Any]:
  """Applies :func:`overrides` in place (``backend``: default JAX's); returns them."""
  if backend is None:
    import jax
    backend = jax.default_backend()
  changes = overrides(config, backend)
  if changes:
    from research.config import override
    override(config, changes)
  return changes
