"""Small helpers for tests: configs, the CLI in a subprocess, an LM loss gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny experiment at smoke size, with dotted-key overrides."""
  from experiments.pretrain import tiny
  from research.config import override
  c = tiny.get_config('smoke=True')
  override(c, overrides)
  return c


def run_cli(args: list[str], *, devices: int = 1, timeout: int = 600, env=None
            ) -> subprocess.CompletedProcess:
  """Runs ``python -m <args>`` from the repo root with N fake CPU devices."""
  e = dict(os.environ)
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
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
