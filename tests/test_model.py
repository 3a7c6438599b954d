"""Transformer model, loss and model-config validation (tiny dims, CPU, jitted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from research.config import ConfigError, base_config
from research.models.loss import lm_loss
from research.models.transformer import (Transformer, count_params, resolved_dims,
                                         validate_model_config)
from research import sharding as shd
from tests.helpers import lm_value_and_grad

VOCAB = 37


def tiny_cfg(**overrides):
  c = base_config().model
  c.vocab_size = VOCAB
  c.d_model = 32
  c.num_layers = 2
  c.num_heads = 4
  c.mlp_dim = 64
  c.max_seq_len = 32
  for k, v in overrides.items():
    c[k] = v
  return c


def build(seed: int = 0, **overrides) -> Transformer:
  return Transformer(tiny_cfg(**overrides), rngs=nnx.Rngs(params=seed, dropout=seed + 1))


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def tokens(batch=2, length=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


def path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def params_by_path(model) -> dict[str, nnx.Variable]:
  return {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def copy_scanned_into_list(scanned: Transformer, listed: Transformer) -> None:
  """Gives the Python-loop model the weights of the scanned one (layer i = slice i)."""
  src = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  dst_state = nnx.state(listed, nnx.Param)
  dst = nnx.to_pure_dict(dst_state)
  for key in src:
    if key != 'blocks':
      dst[key] = src[key]
  for i in dst['blocks']:
    dst['blocks'][i] = jax.tree.map(lambda a, i=i: a[i], src['blocks'])
  nnx.replace_by_pure_dict(dst_state, dst)
  nnx.update(listed, dst_state)


# --------------------------------------------------------------------------- forward


def test_shapes_dtypes_and_hidden():
  model = build()
  x = tokens()
  logits = forward(model, x)
  assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32
  hidden = nnx.jit(lambda m, t: m(t, return_hidden=True))(model, x)
  assert hidden.shape == (2, 12, 32)
  # Hidden states are the final-normed ones: tied logits are hidden @ embedding.T.
  emb = model.embed.embedding[...]
  assert emb.shape == (128, 32)  # Vocabulary padded to a multiple of 128.
  np.testing.assert_allclose(hidden @ emb[:VOCAB].T, logits, atol=1e-5)


def test_causal_masking():
  model = build()
  x = tokens()
  x2 = x.at[:, 7].set((x[:, 7] + 1) % VOCAB)
  a, b = forward(model, x), forward(model, x2)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_bidirectional_when_not_causal():
  model = build(causal=False)
  x = tokens()
  x2 = x.at[:, 7].set((x[:, 7] + 1) % VOCAB)
  a, b = forward(model, x), forward(model, x2)
  assert not np.allclose(a[:, 0], b[:, 0])


def test_padding_mask_hides_padded_keys():
  model = build(causal=False)
  x = tokens()
  mask = jnp.ones_like(x).at[:, 9:].set(0)
  x2 = x.at[:, 10].set((x[:, 10] + 1) % VOCAB)  # Changes only a padded position.
  f = nnx.jit(lambda m, t, mk: m(t, mask_BL=mk))
  np.testing.assert_allclose(f(model, x, mask)[:, :9], f(model, x2, mask)[:, :9], atol=1e-6)


def test_scan_and_loop_give_same_logits():
  scanned = build(seed=0, scan_layers=True)
  listed = build(seed=1, scan_layers=False)
  x = tokens()
  assert not np.allclose(forward(scanned, x), forward(listed, x))
  copy_scanned_into_list(scanned, listed)
  np.testing.assert_allclose(forward(scanned, x), forward(listed, x), atol=1e-5)


def test_scan_layers_does_not_change_the_init():
  """Layer i of the looped model is slice i of the scanned one, for the same seed."""
  scanned = params_by_path(build(seed=3, scan_layers=True))
  listed = params_by_path(build(seed=3, scan_layers=False))
  per_layer = sum(p.startswith('blocks/') for p in scanned)
  assert len(listed) == len(scanned) + per_layer  # Two layers: each path twice.
  for path, v in listed.items():
    if path.startswith('blocks/'):
      _, i, rest = path.split('/', 2)
      np.testing.assert_array_equal(v[...], scanned[f'blocks/{rest}'][...][int(i)])
    else:
      np.testing.assert_array_equal(v[...], scanned[path][...])


def _loss_and_grads(model, x):
  loss, grads = lm_value_and_grad(model, x)
  return loss, jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize('scan,remat', [(True, 'full'), (False, 'dots_saveable')])
def test_remat_keeps_outputs_and_grads(scan, remat):
  x = tokens(length=9)
  loss0, g0 = _loss_and_grads(build(scan_layers=scan, remat='none'), x)
  loss1, g1 = _loss_and_grads(build(scan_layers=scan, remat=remat), x)
  np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('num_kv_heads', [0, 2, 1])  # MHA, GQA, MQA.
def test_attention_head_variants(num_kv_heads):
  model = build(num_kv_heads=num_kv_heads)
  kv = num_kv_heads or 4
  p = params_by_path(model)
  assert p['blocks/attn/query/kernel'].shape == (2, 32, 4, 8)
  assert p['blocks/attn/key/kernel'].shape == (2, 32, kv, 8)
  assert p['blocks/attn/value/kernel'].shape == (2, 32, kv, 8)
  assert p['blocks/attn/out/kernel'].shape == (2, 4, 8, 32)
  assert forward(model, tokens()).shape == (2, 12, VOCAB)


def test_learned_positions_gelu_layernorm_untied_head_dim():
  model = build(positions='learned', mlp_kind='gelu', norm='layernorm',
                tie_embeddings=False, head_dim=16, scan_layers=False)
  p = params_by_path(model)
  assert p['pos_embed/embedding'].shape == (32, 32)
  assert p['unembed/kernel'].shape == (32, 128)
  assert p['blocks/0/mlp/wi/kernel'].shape == (32, 64)
  assert p['blocks/1/attn/query/kernel'].shape == (32, 4, 16)
  assert 'blocks/0/attn_norm/bias' in p and 'final_norm/bias' in p
  assert not any('wi_0' in k for k in p)
  logits = forward(model, tokens())
  assert logits.shape == (2, 12, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
  counts = count_params(model)
  padding = 2 * (128 - VOCAB) * 32  # Unused rows of the embed and unembed tables.
  assert counts['total'] == sum(v.size for v in p.values()) - padding
  assert counts['embedding'] == VOCAB * 32 + 32 * 32  # Token + position lookup tables.


def test_count_params_tied():
  counts = count_params(build())
  # Tied table does the output matmul, so it is non-embedding; no lookup-only tables.
  assert counts['embedding'] == 0 and counts['non_embedding'] == counts['total']
  per_layer = 32 * 4 * 8 * 4 + 3 * 32 * 64 + 2 * 32
  assert counts['total'] == VOCAB * 32 + 2 * per_layer + 32


def test_init_under_mesh_has_logical_partition_specs():
  # 8 fake CPU devices (conftest): data, FSDP and tensor parallelism at once. The
  # vocabulary (37) does not divide by the tensor axis; the model pads its tables.
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  with shd.use_mesh(mesh):
    model = build()
    logits = forward(model, tokens(batch=4))
    abstract = nnx.eval_shape(lambda: build(scan_layers=False, positions='learned',
                                            tie_embeddings=False, norm='layernorm'))
  assert logits.shape == (4, 12, VOCAB)
  np.testing.assert_allclose(logits, forward(build(), tokens(batch=4)), atol=1e-5)
  specs = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(
      nnx.get_partition_spec(nnx.state(model, nnx.Param)))}
  assert specs['blocks/attn/query/kernel'] == P('layers', 'embed', 'heads', 'kv')
  assert specs['blocks/attn/key/kernel'] == P('layers', 'embed', 'kv_heads', 'kv')
  assert specs['blocks/attn/out/kernel'] == P('layers', 'heads', 'kv', 'embed')
  assert specs['blocks/mlp/wi_0/kernel'] == P('layers', 'embed', 'mlp')
  assert specs['blocks/mlp/wo/kernel'] == P('layers', 'mlp', 'embed')
  assert specs['blocks/attn_norm/scale'] == P('layers', 'norm')
  assert specs['embed/embedding'] == P('vocab', 'embed')
  assert specs['final_norm/scale'] == P('norm')
  # Every logical name has a rule, so the trainer can derive shardings.
  shardings = shd.state_shardings(nnx.state(abstract), mesh)
  assert all(isinstance(s, jax.sharding.NamedSharding)
             for s in jax.tree.leaves(shardings))


def test_bf16_compute_keeps_f32_params():
  model = build(dtype='bfloat16', param_dtype='float32')
  assert all(v.dtype == jnp.float32 for v in params_by_path(model).values())
  logits = forward(model, tokens())
  assert logits.dtype == jnp.bfloat16
  ref = forward(build(), tokens())
  np.testing.assert_allclose(logits.astype(jnp.float32), ref, atol=0.05)


def test_dropout_is_random_only_when_not_deterministic():
  model = build(dropout=0.5)
  f = nnx.jit(lambda m, t, d: m(t, deterministic=d), static_argnums=2)
  x = tokens()
  a, b = f(model, x, True), f(model, x, True)
  np.testing.assert_array_equal(a, b)
  c, d = f(model, x, False), f(model, x, False)
  assert not np.allclose(c, d) and not np.allclose(a, c)


# --------------------------------------------------------------------------- loss


def test_loss_ignores_padding_logits():
  key = jax.random.key(0)
  logits = jax.random.normal(key, (2, 5, 7))
  targets = jax.random.randint(key, (2, 5), 0, 7)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], jnp.float32)
  loss, aux = jax.jit(lm_loss)(logits, targets, mask)
  garbage = logits.at[0, 3:].set(1e4).at[1, 4].set(jnp.nan)
  loss2, _ = jax.jit(lm_loss)(garbage, targets, mask)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  grads = jax.jit(jax.grad(lambda l: lm_loss(l, targets, mask)[0]))(logits)
  assert float(jnp.abs(grads[0, 3:]).max()) == 0.0
  assert float(aux['num_tokens']) == 7.0
  # Hand check against numpy.
  lg = np.asarray(logits, np.float64)
  lse = np.log(np.exp(lg).sum(-1))
  ce = lse - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]
  m = np.asarray(mask)
  np.testing.assert_allclose(aux['ce'], (ce * m).sum() / m.sum(), rtol=1e-5)


def test_z_loss_hand_check():
  logits = jnp.array([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]])
  targets = jnp.array([[2, 0]])
  mask = jnp.ones((1, 2))
  loss, aux = lm_loss(logits, targets, mask, z_loss_weight=1e-2)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))[0]
  ce = ((lse[0] - 2.0) + (lse[1] - 3.0)) / 2
  z = 1e-2 * (lse ** 2).mean()
  np.testing.assert_allclose(aux['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(aux['z_loss'], z, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + z, rtol=1e-5)
  assert lm_loss(logits, targets, mask)[1]['z_loss'] == 0.0


# --------------------------------------------------------------------------- config


def test_resolved_dims_defaults():
  c = tiny_cfg(d_model=128, num_heads=4, mlp_dim=0)
  assert resolved_dims(c) == {'head_dim': 32, 'num_kv_heads': 4, 'mlp_dim': 384}
  c = tiny_cfg(d_model=96, num_heads=4, num_kv_heads=1, head_dim=64, mlp_kind='gelu',
               mlp_dim=0)
  assert resolved_dims(c) == {'head_dim': 64, 'num_kv_heads': 1, 'mlp_dim': 384}


@pytest.mark.parametrize('overrides,seq_len,needle', [
    ({'num_heads': 8, 'num_kv_heads': 3, 'd_model': 64}, 16,
     'model.num_kv_heads=3 does not divide model.num_heads=8; use a divisor of 8 such as '
     '1, 2, 4 or 8'),
    ({'d_model': 30}, 16, 'model.d_model=30 is not divisible by model.num_heads=4'),
    ({}, 2048, 'seq_len=2048 exceeds model.max_seq_len=32; raise model.max_seq_len'),
    ({'mlp_kind': 'relu'}, 16, "model.mlp_kind='relu' is unknown"),
    ({'norm': 'batchnorm'}, 16, "model.norm='batchnorm' is unknown"),
    ({'positions': 'alibi'}, 16, "model.positions='alibi' is unknown"),
    ({'remat': 'some'}, 16, "model.remat='some' is unknown"),
    ({'dtype': 'float16'}, 16, "model.dtype='float16' is unknown"),
    ({'param_dtype': 'fp32'}, 16, "model.param_dtype='fp32' is unknown"),
    ({'attention_impl': 'flash'}, 16, "model.attention_impl='flash' is unknown"),
    ({'head_dim': 7}, 16, 'needs an even head dimension'),
    ({'dropout': 1.0}, 16, 'model.dropout=1.0 must be in [0, 1)'),
    ({'num_layers': 0}, 16, 'model.num_layers=0 must be a positive integer'),
    ({'num_kv_heads': -1}, 16, 'model.num_kv_heads=-1 must be an integer >= 0'),
])
def test_validation_errors_are_one_line_and_name_the_key(overrides, seq_len, needle):
  with pytest.raises(ConfigError) as e:
    validate_model_config(tiny_cfg(**overrides), seq_len)
  msg = str(e.value)
  assert needle in msg and '\n' not in msg


def test_valid_config_passes_and_cudnn_needs_gpu():
  validate_model_config(tiny_cfg(), 32)
  validate_model_config(base_config().model, 256)
  with pytest.raises(ConfigError, match="set model.dtype='bfloat16'"):
    validate_model_config(tiny_cfg(attention_impl='cudnn'), 16)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ConfigError, match="model.attention_impl='cudnn' needs an NVIDIA GPU"):
      validate_model_config(tiny_cfg(attention_impl='cudnn', dtype='bfloat16'), 16)


def test_unresolved_vocab_is_refused():
  with pytest.raises(ConfigError, match='model.vocab_size=0 must be resolved'):
    build(vocab_size=0)
