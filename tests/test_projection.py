"""``model.projection_vjp='transpose_input'``: the same gradients as autodiff.

The custom VJP (research/models/projection.py) only changes how XLA lays out the
weight-gradient dot; every gradient must match plain autodiff to float32 rounding,
for each projection shape in the model, for the whole Transformer (scanned, looped,
rematerialised), and it must refuse what it does not support with the key's name.
The sharded check (under five meshes' reference losses) is in test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ConfigError, base_config
from research.models.projection import (_trailing_contraction, linear_dot_general,
                                        module_kwargs, projection_einsum)
from research.models.transformer import Transformer
from tests.helpers import lm_value_and_grad, smoke_config

# float32 gradients summed in a different order: measured max |diff| ~1e-7 on these
# O(1) gradients; 1e-5 is loose enough for any BLAS order and far below a wrong term.
ATOL = 1e-5


@pytest.mark.parametrize('eq,x_shape,w_shape', [
    ('BLD,DNH->BLNH', (2, 5, 6), (6, 3, 4)),   # query/key/value
    ('BLNH,NHD->BLD', (2, 5, 3, 4), (3, 4, 6)),  # attention output (two contracted axes)
    ('BLD,DF->BLF', (2, 5, 6), (6, 7)),          # MLP (nnx.Linear's contraction)
])
def test_projection_matches_einsum_values_and_grads(eq, x_shape, w_shape):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  out_shape = jnp.einsum(eq, x, w).shape
  c = jax.random.normal(kc, out_shape)  # A cotangent with no symmetry to hide errors.

  def loss(op):
    return lambda x, w: jnp.sum(jnp.tanh(op(eq, x, w)) * c)

  want = jax.value_and_grad(loss(jnp.einsum), argnums=(0, 1))(x, w)
  got = jax.jit(jax.value_and_grad(loss(projection_einsum), argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, ref in zip(got[1], want[1]):
    assert g.shape == ref.shape and g.dtype == ref.dtype
    np.testing.assert_allclose(g, ref, atol=ATOL)


def test_bf16_activations_keep_their_dtypes():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  w = jnp.ones((4, 5), jnp.bfloat16)
  gx, gw = jax.grad(lambda x, w: jnp.sum(projection_einsum('BLD,DF->BLF', x, w)
                                        .astype(jnp.float32)), argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(gw, np.float32), 6.0)  # 2*3 tokens of ones.


def _model_cfg(**overrides):
  c = base_config().model
  c.update(vocab_size=37, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
           max_seq_len=32, **overrides)
  return c


@pytest.mark.parametrize('overrides', [
    {'scan_layers': True},
    {'scan_layers': False, 'remat': 'dots_saveable', 'num_kv_heads': 2},
    {'mlp_kind': 'gelu', 'use_bias': True, 'norm': 'layernorm', 'positions': 'learned'},
])
def test_transformer_grads_match_autodiff(overrides):
  tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 37)
  results = {}
  for vjp in ('autodiff', 'transpose_input'):
    model = Transformer(_model_cfg(projection_vjp=vjp, **overrides),
                        rngs=nnx.Rngs(params=0))
    for path, mod in nnx.iter_modules(model):
      if isinstance(mod, (nnx.Einsum, nnx.Linear)) and 'unembed' not in path:
        custom = (getattr(mod, 'einsum_op', None) is projection_einsum
                  or getattr(mod, 'dot_general', None) is linear_dot_general)
        assert custom == (vjp == 'transpose_input')
    loss, grads = lm_value_and_grad(model, tokens)
    results[vjp] = (loss, nnx.to_pure_dict(grads))
  (l0, g0), (l1, g1) = results['autodiff'], results['transpose_input']
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves_with_path(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1)
  for (path, a), b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, atol=ATOL, err_msg=jax.tree_util.keystr(path))


def test_unsupported_einsum_and_value_are_refused_by_name():
  assert _trailing_contraction('BLD,DNH->BLNH') == 1
  assert _trailing_contraction('BLNH,NHD->BLD') == 2
  assert _trailing_contraction('BLD,LD->BL') is None  # Not a projection.
  with pytest.raises(ValueError, match="model.projection_vjp='transpose_input'"):
    projection_einsum('BND,NDH->BNH', jnp.ones((1, 2, 3)), jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match='model.projection_vjp'):
    module_kwargs('fast')


def test_config_validation_names_the_key():
  from research.validation import validate_config
  with pytest.raises(ConfigError, match=r"model.projection_vjp='fast' is unknown"):
    validate_config(smoke_config(**{'model.projection_vjp': 'fast'}))
  with pytest.raises(ConfigError, match=r"model.projection_vjp='transpose_input'.*quant"):
    validate_config(smoke_config(**{'model.projection_vjp': 'transpose_input',
                                    'quant.mode': 'qat'}))


def test_ptq_of_a_transpose_input_model_equals_ptq_of_autodiff():
  """qwix intercepts the projections' ops: quantize_to_integers puts the plain ops back."""
  from research.quant.ptq import quantize_to_integers
  outs = {}
  for vjp in ('autodiff', 'transpose_input'):
    c = smoke_config(**{'model.vocab_size': 259, 'model.projection_vjp': vjp,
                        'quant.mode': 'ptq', 'quant.weight_bits': 4, 'quant.init_from': '/x'})
    tokens = jnp.arange(c.batch_size * 8, dtype=jnp.int32).reshape(c.batch_size, 8) % 259
    model = Transformer(c.model, rngs=nnx.Rngs(params=0))
    outs[vjp] = np.asarray(quantize_to_integers(model, c)(tokens))
  float_out = np.asarray(Transformer(c.model, rngs=nnx.Rngs(params=0))(tokens))
  assert np.abs(outs['autodiff'] - float_out).max() > 1e-3  # int4 really quantized.
  np.testing.assert_allclose(outs['transpose_input'], outs['autodiff'], atol=1e-6)
