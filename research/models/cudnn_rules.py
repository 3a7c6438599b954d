"""What cuDNN fused attention accepts, checked on the config before anything compiles.

``model.attention_impl='cudnn'`` routes attention to ``jax.nn.dot_product_attention(...,
implementation='cudnn')``. The installed jax (0.10.2) refuses, at trace time on a GPU
and deep inside the model, what its cuDNN wrapper cannot run
(``jax/_src/cudnn/fused_attention_stablehlo.py``):

* ``check_layout``: Q/K/V dtype float16 or bfloat16 (fp8 only through the fp8 API):
  a float32 model is refused ("Q must be fp16/bf16/fp8...");
* ``check_is_flash_attention``: head dim a multiple of 8 and at most 128, or at most
  256 on Hopper (compute capability 9.0) and later;
* the custom partitioning rules: "Sharding on sequence dim is not allowed" (only the
  batch and head axes may be sharded), so ``mesh.sequence > 1`` cannot run it;
* K/V heads must divide the query heads (GQA), as for every implementation.

:func:`check` turns each into one :class:`ConfigError` naming the key and the fix.
Masks (padding, windows, segment ids) are not refused here: the attention module folds
what cuDNN can take and falls back to XLA with a logged reason for the rest
(:func:`research.models.attention.plan_attention`).
"""

from __future__ import annotations

import ml_collections

from research.config import ConfigError

CUDNN_DTYPES = ('bfloat16', 'float16')
HEAD_DIM_MAX = 128  # Before Hopper.
HEAD_DIM_MAX_HOPPER = 256  # Compute capability >= 9.0.


def head_dim_limit(compute_capability: tuple[int, int] | None) -> int:
  """The largest head dim cuDNN takes on a GPU of this compute capability.

  ``None`` (unknown: validating a config away from the GPU) gives the Hopper limit;
  the GPU run itself, or ``launch.gpu_check``, applies the exact one.
  """
  if compute_capability is None or tuple(compute_capability) >= (9, 0):
    return HEAD_DIM_MAX_HOPPER
  return HEAD_DIM_MAX


def check(config: ml_collections.ConfigDict,
          compute_capability: tuple[int, int] | None = None) -> None:
  """Raises a one-line :class:`ConfigError` when cuDNN attention cannot run ``config``.

  A no-op unless ``model.attention_impl == 'cudnn'``.
  """
  m = config.model
  if m.attention_impl != 'cudnn':
    return
  from research.models.transformer import resolved_dims
  dims = resolved_dims(m)
  if m.dtype not in CUDNN_DTYPES:
    raise ConfigError(
        f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16 (cuDNN fused "
        f"attention takes fp16/bf16 Q/K/V), got model.dtype={m.dtype!r}; set "
        f"model.dtype='bfloat16' or model.attention_impl='xla'.")
  head_dim = dims['head_dim']
  limit = head_dim_limit(compute_capability)
  if head_dim % 8 or head_dim > limit:
    where = ('' if compute_capability is None else
             f' on compute capability {compute_capability[0]}.{compute_capability[1]}')
    raise ConfigError(
        f"model.attention_impl='cudnn' needs a head dim that is a multiple of 8 and at most "
        f"{limit}{where} (at most {HEAD_DIM_MAX} before Hopper), got {head_dim} "
        f"(model.head_dim={m.head_dim}, d_model={m.d_model}, num_heads={m.num_heads}); set "
        f"model.head_dim (or num_heads) accordingly, or model.attention_impl='xla'.")
  if m.num_heads % dims['num_kv_heads']:
    raise ConfigError(
        f"model.num_kv_heads={dims['num_kv_heads']} must divide model.num_heads="
        f"{m.num_heads} (grouped-query attention); choose a divisor.")
  seq_shards = config.mesh.get('sequence', 1) if 'mesh' in config else 1
  if seq_shards not in (1,):
    raise ConfigError(
        f"model.attention_impl='cudnn' cannot run with mesh.sequence={seq_shards}: jax's "
        f"cuDNN attention allows sharding only the batch and head axes (\"Sharding on "
        f"sequence dim is not allowed\"); set mesh.sequence=1 or model.attention_impl='xla'.")
