"""Small helpers for tests: configs, the CLI in a subprocess, an LM loss gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The multi-process tests' run (tiny.py:smoke=True): 20 steps, a checkpoint and an eval
# at 10 and 20. conftest.py's reference_losses trains it once in the pytest process.
MULTI_PROCESS_RUN = {'steps': 20, 'log_every': 1, 'eval_every': 10, 'checkpoint_every': 10,
                     'num_samples': 0}


def smoke_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny experiment at smoke size, with dotted-key overrides."""
  from experiments.pretrain import tiny
  from research.config import override
  c = tiny.get_config('smoke=True')
  override(c, overrides)
  return c


def suite_xla_flags() -> str:
  """The suite's XLA_FLAGS (tests/conftest.py) without its device count, for a child
  process that chooses its own (launch.local, a subprocess with N devices)."""
  from research.backend_defaults import xla_flags_with_cpu_devices
  return xla_flags_with_cpu_devices(os.environ.get('XLA_FLAGS', ''), None)


def run_cli(args: list[str], *, devices: int = 1, timeout: int = 600, env=None
            ) -> subprocess.CompletedProcess:
  """Runs ``python -m <args>`` from the repo root with N fake CPU devices."""
  e = dict(os.environ)
  from research.backend_defaults import xla_flags_with_cpu_devices
  e['XLA_FLAGS'] = xla_flags_with_cpu_devices(os.environ.get('XLA_FLAGS', ''), devices)
  e['JAX_PLATFORMS'] = 'cpu'
  e.update(env or {})
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=e, timeout=timeout,
                        capture_output=True, text=True)


def lm_value_and_grad(model, tokens):
  """Jitted ``(next-token loss, nnx grads)`` of ``model`` on ``tokens`` [B, L+1]."""
  import jax.numpy as jnp
  from flax import nnx
  from research.models.loss import lm_loss

  @nnx.jit
  def value_and_grad(model, x):
    def loss_fn(model):
      logits = model(x[:, :-1])
      return lm_loss(logits, x[:, 1:], jnp.ones(x[:, 1:].shape))[0]
    return nnx.value_and_grad(loss_fn)(model)
  return value_and_grad(model, tokens)


def train_losses(workdir) -> dict[int, float]:
  """{step: loss} of a run's train rows in metrics.jsonl."""
  import json
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if row['split'] == 'train':
        out[row['step']] = row['loss']
  return out


def assert_one_line_config_error_before_compiling(config, workdir, needles) -> str:
  """``recipe.run(config)`` raises a one-line ConfigError containing every needle, and
  nothing was compiled first (nor loaded from the session's compilation cache)."""
  import jax
  import pytest

  from research.config import ConfigError
  from research.recipe import run as train
  compiles = []

  def listener(event, duration=None, **kwargs):
    if event in ('/jax/core/compile/backend_compile_duration',
                 '/jax/compilation_cache/cache_hits'):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(listener)
  try:
    with pytest.raises(ConfigError) as e:
      train(config, str(workdir))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(listener)
  msg = str(e.value)
  assert '\n' not in msg
  for needle in needles:
    assert needle in msg, msg
  assert not compiles, f'failed only after compiling: {msg}'
  return msg
