"""LoRA: adapters start at zero, only they train (and hold optimizer state), merging
them into the kernels gives the same logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.config import ConfigError, base_config
from research.finetune.feature import trainable_filter
from research.models import lora
from research.models.transformer import Transformer

TARGETS = r'attn/(query|key|value|out)|mlp/(wi_0|wi_1|wi|wo)'


def small_cfg(**kw):
  c = base_config().model
  c.vocab_size, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim = 61, 32, 4, 2, 48
  for k, v in kw.items():
    c[k] = v
  return c


def tokens(b=2, l=9, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 61, size=(b, l)), jnp.int32)


@nnx.jit
def forward(model, x):
  return model(x)


def randomize_adapters(model, seed=1):
  for i, (_, m) in enumerate(lora.lora_modules(model)):
    m.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def expected_lora_params(cfg, rank):
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.d_model // cfg.num_heads, \
      cfg.mlp_dim
  per_layer = ((d + n * h) + 2 * (d + k * h) + (n * h + d)) * rank  # q, k, v, out
  per_layer += (2 * (d + f) + (f + d)) * rank  # wi_0, wi_1, wo
  return per_layer * cfg.num_layers


@pytest.mark.parametrize('scan', [True, False])
def test_zero_init_then_merge_gives_same_logits(scan):
  cfg = small_cfg(scan_layers=scan, use_bias=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = tokens()
  base = forward(model, x)
  names = lora.apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
  assert len(names) == 7 * (1 if scan else cfg.num_layers)
  np.testing.assert_allclose(forward(model, x), base, atol=1e-6)  # B = 0: the base model.
  assert lora.count_lora_params(model) == expected_lora_params(cfg, 4)
  randomize_adapters(model)
  adapted = forward(model, x)
  assert float(jnp.abs(adapted - base).max()) > 1e-2
  lora.merge_lora(model)
  assert not lora.lora_modules(model)
  paths = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
  assert not any('lora' in p for p in paths)
  # The merged model has the plain architecture: its state fits a fresh Transformer.
  fresh = Transformer(cfg, rngs=nnx.Rngs(3))
  nnx.update(fresh, nnx.state(model))
  np.testing.assert_allclose(forward(fresh, x), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_train_and_hold_optimizer_state():
  from research.step import train_step
  from research.tasks.lm import lm_forward, lm_loss

  def lm_objective(m, batch, deterministic):
    return lm_loss(m, lm_forward(m, batch, deterministic), batch, deterministic)

  cfg = small_cfg()
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
  wrt = trainable_filter('lora')
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
  n_lora = lora.count_lora_params(model)
  opt_leaves = [x for x in jax.tree.leaves(nnx.state(opt)) if getattr(x, 'ndim', 0) > 0]
  assert sum(x.size for x in opt_leaves) == 2 * n_lora  # Adam mu + nu, adapters only.
  before = {('/'.join(map(str, p))): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  graphdef, state = nnx.split((model, opt))
  x = tokens(4, 12)
  batch = {'inputs': x, 'targets': jnp.roll(x, -1, 1), 'mask': jnp.ones(x.shape)}
  step = jax.jit(functools.partial(train_step, graphdef, objective=lm_objective,
                                   accum_steps=1, wrt=wrt))
  state, _ = step(state, batch)
  state, _ = step(state, batch)
  model, _ = nnx.merge(graphdef, state)
  after = {('/'.join(map(str, p))): np.asarray(v[...])
           for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and all('lora_' in p for p in changed), changed
  assert any(p.endswith('lora_b') for p in changed)


def test_dropout_only_in_training():
  model = Transformer(small_cfg(scan_layers=False, num_layers=1), rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=4, alpha=8.0, targets='attn/query', dropout=0.5)
  randomize_adapters(model)
  x = tokens()
  eval_out = model(x)
  np.testing.assert_array_equal(model(x), eval_out)
  lora.set_lora_deterministic(model, False)
  a, b = model(x), model(x)
  assert float(jnp.abs(a - eval_out).max()) > 0 and float(jnp.abs(a - b).max()) > 0
  lora.set_lora_deterministic(model, True)
  np.testing.assert_array_equal(model(x), eval_out)


def test_bad_targets_and_modes_are_clear_errors():
  model = Transformer(small_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='matches no projection'):
    lora.apply_lora(model, rank=4, alpha=8.0, targets='nothing_like_this')
  from research.feature_validation import validate_finetune
  from tests.helpers import smoke_config
  with pytest.raises(ConfigError, match='linear_probe'):
    validate_finetune(smoke_config(**{'finetune.mode': 'linear_probe'}))  # LM: no head.
  with pytest.raises(ConfigError, match='finetune.mode'):
    validate_finetune(smoke_config(**{'finetune.mode': 'half'}))
