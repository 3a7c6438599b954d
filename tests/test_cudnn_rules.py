"""cuDNN attention config rules: what jax 0.10.2's cuDNN wrapper refuses, refused early."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from research.config import ConfigError
from research.models import cudnn_rules
from tests.helpers import smoke_config


def cudnn_config(**overrides):
  base = {'model.attention_impl': 'cudnn', 'model.dtype': 'bfloat16', 'model.d_model': 128,
          'model.num_heads': 4}
  base.update(overrides)
  return smoke_config(**base)


def one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert '\n' not in msg
  return msg


def test_a_valid_cudnn_config_passes_and_xla_is_never_checked():
  cudnn_rules.check(cudnn_config())  # head_dim 32, bf16, no sequence sharding.
  cudnn_rules.check(cudnn_config(**{'model.num_kv_heads': 2}))  # GQA.
  # XLA attention takes anything: float32, odd head dims, sequence sharding.
  cudnn_rules.check(cudnn_config(**{'model.attention_impl': 'xla', 'model.dtype': 'float32',
                                    'model.head_dim': 12, 'mesh.sequence': 2}))


def test_float32_is_refused_naming_the_dtype_key():
  with pytest.raises(ConfigError) as e:
    cudnn_rules.check(cudnn_config(**{'model.dtype': 'float32'}))
  msg = one_line(e)
  assert "model.dtype='float32'" in msg and "model.dtype='bfloat16'" in msg


@pytest.mark.parametrize('head_dim,cc,ok', [
    (64, None, True), (128, (8, 0), True), (136, (8, 0), False), (136, (9, 0), True),
    (256, None, True), (264, None, False), (12, None, False), (40, (8, 6), True)])
def test_head_dim_rules_follow_the_compute_capability(head_dim, cc, ok):
  c = cudnn_config(**{'model.head_dim': head_dim})
  if ok:
    cudnn_rules.check(c, cc)
    return
  with pytest.raises(ConfigError) as e:
    cudnn_rules.check(c, cc)
  msg = one_line(e)
  assert 'multiple of 8' in msg and f'got {head_dim}' in msg and 'model.head_dim' in msg


def test_sequence_sharding_is_refused():
  with pytest.raises(ConfigError) as e:
    cudnn_rules.check(cudnn_config(**{'mesh.sequence': 2}))
  msg = one_line(e)
  assert 'mesh.sequence=2' in msg and 'mesh.sequence=1' in msg


def test_the_rules_match_what_jax_refuses():
  """The dtype and head-dim rules are jax's own checks (run on CPU, no GPU needed)."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  q = jnp.zeros((1, 8, 2, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match='fp16/bf16'):
    fa.check_layout(q, q, q, None, None, None, None, None, None, None,
                    fa.AttentionLayout.BTNH)
  fa.check_layout(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                  None, None, None, None, None, None, None, fa.AttentionLayout.BTNH)
  # On this (non-CUDA) backend jax applies the pre-Hopper limit: 128.
  for head_dim, ok in ((128, True), (136, False), (12, False)):
    x = jnp.zeros((1, 8, 2, head_dim), jnp.bfloat16)
    if ok:
      fa.check_is_flash_attention(x, x, x, fa.AttentionLayout.BTNH.value, 90000, False, True)
    else:
      with pytest.raises(NotImplementedError, match='multiple of 8'):
        fa.check_is_flash_attention(x, x, x, fa.AttentionLayout.BTNH.value, 90000, False, True)
      with pytest.raises(ConfigError):
        cudnn_rules.check(cudnn_config(**{'model.head_dim': head_dim}), (8, 0))
  assert np.isfinite(cudnn_rules.HEAD_DIM_MAX)
