"""Decoder-only (or bidirectional encoder) Transformer in Flax NNX.

Pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``) and a final norm; RoPE
or learned absolute positions; MHA/GQA/MQA; SwiGLU or GELU MLP; tied or untied output
head. With ``scan_layers`` the blocks are created once with ``nnx.vmap`` (parameters
stacked on a leading ``'layers'`` axis) and applied with ``nnx.scan``, so compile time
does not grow with depth; otherwise they are a Python list applied in a loop. An
optional rematerialisation policy (``jax.checkpoint``) wraps each block.

Parameter paths (``'/'``-joined, as the optimizer's regex rules see them)::

  embed/embedding                      [Vp, D]       ('vocab', 'embed')
  pos_embed/embedding                  [T_max, D]    ('pos', 'embed')       learned only
  blocks/attn_norm/scale               [(Ly,) D]     (('layers',) 'norm')   (+ /bias)
  blocks/attn/query/kernel             [(Ly,) D, N, Dh]   ('embed', 'heads', 'kv')
  blocks/attn/{key,value}/kernel       [(Ly,) D, K, Dh]   ('embed', 'kv_heads', 'kv')
  blocks/attn/out/kernel               [(Ly,) N, Dh, D]   ('heads', 'kv', 'embed')
  blocks/mlp_norm/scale                [(Ly,) D]
  blocks/mlp/{wi_0,wi_1,wi}/kernel     [(Ly,) D, F]       ('embed', 'mlp')
  blocks/mlp/wo/kernel                 [(Ly,) F, D]       ('mlp', 'embed')
  blocks/moe/router/kernel             [(Ly,) D, E]       ('embed', None)   MoE only
  blocks/moe/{wi_0,wi_1,wi}            [(Ly,) E, D, F]    ('exp', 'embed', 'mlp')
  blocks/moe/wo                        [(Ly,) E, F, D]    ('exp', 'mlp', 'embed')
  final_norm/scale                     [D]
  unembed/kernel                       [D, Vp]       ('embed', 'vocab')     untied only
  .../{query,key,value,out,wi,wi_0,wi_1,wo}/bias   output shape   model.use_bias only

With ``model.moe_num_experts`` > 0 (research/models/moe.py) the routed experts are
``blocks/moe`` and ``blocks/mlp`` is the shared experts' MLP (absent without them).
``Vp`` is the vocabulary padded to a multiple of 128 (:func:`padded_vocab_size`).
With ``scan_layers=True`` block parameters have the leading ``Ly`` axis (logical
``'layers'``); with ``scan_layers=False`` the paths are ``blocks/0/...``,
``blocks/1/...``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.core import spmd
from jax.ad_checkpoint import checkpoint_name

from research.config import ConfigError
from research.models import context_parallel, layers, pipeline, projection
from research.models import moe as moe_lib
from research.models.attention import (ROPE_SCALINGS, Attention, RopeScaling,
                                        rope_angles, rope_frequencies)
from research.sharding import constrain

MLP_KINDS = ('swiglu', 'gelu')
NORMS = ('rmsnorm', 'layernorm')
POSITIONS = ('rope', 'learned')
ATTENTION_IMPLS = ('xla', 'cudnn')
DTYPE_NAMES = tuple(layers.DTYPES)
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

KVCache = dict[str, jax.Array]  # {'k', 'v': [layers, B, T_max, K, Dh], 'index': int32 []}

# The embedding/unembedding tables get rows up to a multiple of this, so the 'vocab'
# axis divides any tensor-parallel degree up to 128 (the byte tokenizer's 259 is prime)
# and matmul shapes are accelerator-friendly (GPT-2's 50257 -> 50304 trick). Logits are
# sliced back to the real vocabulary, so the padding is invisible outside the model.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
  return VOCAB_PAD_MULTIPLE * math.ceil(vocab_size / VOCAB_PAD_MULTIPLE)


# --------------------------------------------------------------------------- config


def resolved_dims(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """``head_dim``, ``num_kv_heads`` and ``mlp_dim`` with the config's 0 = default rules.

  head_dim 0 -> d_model // num_heads; num_kv_heads 0 -> num_heads (MHA); mlp_dim 0 ->
  4 * d_model for gelu, 8/3 * d_model rounded up to a multiple of 64 for swiglu (the
  same parameter count as a 4x GELU MLP, LLaMA style).
  """
  head_dim = cfg.head_dim or cfg.d_model // max(cfg.num_heads, 1)
  num_kv_heads = cfg.num_kv_heads or cfg.num_heads
  if cfg.mlp_dim:
    mlp_dim = cfg.mlp_dim
  elif cfg.mlp_kind == 'swiglu':
    mlp_dim = 64 * math.ceil(8 * cfg.d_model / 3 / 64)
  else:
    mlp_dim = 4 * cfg.d_model
  return {'head_dim': int(head_dim), 'num_kv_heads': int(num_kv_heads),
          'mlp_dim': int(mlp_dim)}


def layer_windows(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Sliding window of each layer (0 = full attention).

  ``model.window_layers`` is a pattern of ``'L'`` (local: ``model.sliding_window``) and
  ``'G'`` (global) repeated cyclically over the layers: ``''`` every layer local,
  ``'LG'`` Gemma-2's alternation, a string of ``num_layers`` letters any per-layer
  choice (Qwen2's ``layer_types``).
  """
  if not cfg.sliding_window:
    return (0,) * cfg.num_layers
  pattern = cfg.window_layers or 'L'
  return tuple(int(cfg.sliding_window) if pattern[i % len(pattern)] == 'L' else 0
               for i in range(cfg.num_layers))


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def validate_model_config(cfg: ml_collections.ConfigDict, seq_len: int | None = None) -> None:
  """Raises :class:`ConfigError` (one line naming the key and the fix); builds nothing."""
  for key, allowed in (('mlp_kind', MLP_KINDS), ('norm', NORMS), ('positions', POSITIONS),
                       ('remat', tuple(REMAT_POLICIES)), ('attention_impl', ATTENTION_IMPLS),
                       ('projection_vjp', projection.PROJECTION_VJPS),
                       ('dtype', DTYPE_NAMES), ('param_dtype', DTYPE_NAMES)):
    if cfg[key] not in allowed:
      raise ConfigError(
          f'model.{key}={cfg[key]!r} is unknown; use one of {", ".join(map(repr, allowed))}.')
  for key in ('d_model', 'num_layers', 'num_heads', 'max_seq_len'):
    if not _is_int(cfg[key]) or cfg[key] <= 0:
      raise ConfigError(f'model.{key}={cfg[key]!r} must be a positive integer.')
  for key, meaning in (('vocab_size', "the tokenizer's size"), ('num_kv_heads', 'num_heads'),
                       ('head_dim', 'd_model // num_heads'), ('mlp_dim', 'the default')):
    if not _is_int(cfg[key]) or cfg[key] < 0:
      raise ConfigError(
          f'model.{key}={cfg[key]!r} must be an integer >= 0 (0 means {meaning}).')
  if not _is_int(cfg.scan_unroll) or cfg.scan_unroll < 0:
    raise ConfigError(f'model.scan_unroll={cfg.scan_unroll!r} must be an integer >= 0 '
                      f'(layers per scan iteration; 0: all).')
  for key in ('tie_embeddings', 'scan_layers', 'causal', 'use_bias'):
    if not isinstance(cfg[key], bool):
      raise ConfigError(f'model.{key}={cfg[key]!r} must be True or False.')

  h = cfg.num_heads
  if cfg.num_kv_heads and h % cfg.num_kv_heads:
    divisors = [i for i in range(1, h + 1) if h % i == 0]
    listed = (', '.join(map(str, divisors[:-1])) + f' or {divisors[-1]}'
              if len(divisors) > 1 else str(divisors[0]))
    raise ConfigError(
        f'model.num_kv_heads={cfg.num_kv_heads} does not divide model.num_heads={h}; '
        f'use a divisor of {h} such as {listed}.')
  if not cfg.head_dim and cfg.d_model % h:
    raise ConfigError(
        f'model.d_model={cfg.d_model} is not divisible by model.num_heads={h}; change one '
        f'of them or set model.head_dim explicitly.')
  dims = resolved_dims(cfg)
  if cfg.positions == 'rope':
    if dims['head_dim'] % 2:
      raise ConfigError(
          f'model.positions=\'rope\' needs an even head dimension, got {dims["head_dim"]}; '
          f'set model.head_dim (or d_model/num_heads) to an even number.')
    if not cfg.rope_theta > 0:
      raise ConfigError(f'model.rope_theta={cfg.rope_theta!r} must be > 0 (e.g. 10000.0).')
  _validate_rope_scaling(cfg)
  if not _is_int(cfg.sliding_window) or cfg.sliding_window < 0:
    raise ConfigError(f'model.sliding_window={cfg.sliding_window!r} must be an integer >= 0 '
                      f'(0 means full attention).')
  if not isinstance(cfg.window_layers, str) or set(cfg.window_layers) - set('LG'):
    raise ConfigError(f"model.window_layers={cfg.window_layers!r} must be a string of 'L' "
                      f"(local) and 'G' (global) letters, e.g. 'LG'.")
  if len(cfg.window_layers) > cfg.num_layers:
    raise ConfigError(f'model.window_layers={cfg.window_layers!r} has more letters than '
                      f'model.num_layers={cfg.num_layers}; give at most one per layer.')
  if cfg.window_layers and not cfg.sliding_window:
    raise ConfigError(f'model.window_layers={cfg.window_layers!r} needs '
                      f'model.sliding_window > 0; set it or clear window_layers.')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f'model.dropout={cfg.dropout!r} must be in [0, 1); use 0.0 to disable.')
  if not cfg.norm_eps > 0:
    raise ConfigError(f'model.norm_eps={cfg.norm_eps!r} must be > 0 (e.g. 1e-6).')
  if not cfg.init_std > 0:
    raise ConfigError(f'model.init_std={cfg.init_std!r} must be > 0 (e.g. 0.02).')
  _validate_moe(cfg)
  if seq_len is not None and seq_len > cfg.max_seq_len:
    raise ConfigError(
        f'seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}; '
        f'raise model.max_seq_len or lower seq_len.')
  if cfg.attention_impl == 'cudnn' and cfg.dtype != 'bfloat16':
    raise ConfigError(
        f"model.attention_impl='cudnn' runs in half precision but model.dtype="
        f"{cfg.dtype!r}; set model.dtype='bfloat16' or use model.attention_impl='xla'.")
  if cfg.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ConfigError(
        f"model.attention_impl='cudnn' needs an NVIDIA GPU but the backend is "
        f"{jax.default_backend()!r}; use model.attention_impl='xla'.")


def _validate_moe(cfg: ml_collections.ConfigDict) -> None:
  """The model.moe_* keys (research/models/moe.py)."""
  for key in ('moe_num_experts', 'moe_mlp_dim', 'moe_shared_experts'):
    if not _is_int(cfg[key]) or cfg[key] < 0:
      raise ConfigError(f'model.{key}={cfg[key]!r} must be an integer >= 0.')
  for key in ('moe_capacity_factor', 'moe_lb_loss', 'moe_z_loss'):
    if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or not cfg[key] >= 0:
      raise ConfigError(f'model.{key}={cfg[key]!r} must be a number >= 0.')
  if not isinstance(cfg.moe_norm_topk, bool):
    raise ConfigError(f'model.moe_norm_topk={cfg.moe_norm_topk!r} must be True or False.')
  e = cfg.moe_num_experts
  if not e:
    return
  if not _is_int(cfg.moe_top_k) or not 1 <= cfg.moe_top_k <= e:
    raise ConfigError(f'model.moe_top_k={cfg.moe_top_k!r} must be between 1 and '
                      f'model.moe_num_experts={e}; lower moe_top_k or add experts.')
  if cfg.use_bias:
    raise ConfigError('model.use_bias=True is not supported with model.moe_num_experts > 0 '
                      '(experts have no biases); set model.use_bias=False.')


def _validate_rope_scaling(cfg: ml_collections.ConfigDict) -> None:
  kind = cfg.rope_scaling
  if kind not in ROPE_SCALINGS:
    raise ConfigError(f'model.rope_scaling={kind!r} is unknown; use one of '
                      f'{", ".join(map(repr, ROPE_SCALINGS))}.')
  if kind == 'none':
    return
  if cfg.positions != 'rope':
    raise ConfigError(f"model.rope_scaling={kind!r} needs model.positions='rope'; set "
                      f"rope_scaling='none'.")
  if not cfg.rope_factor > 0:
    raise ConfigError(f'model.rope_factor={cfg.rope_factor!r} must be > 0 (e.g. 8.0).')
  if kind in ('llama3', 'yarn') and not (_is_int(cfg.rope_original_max_len)
                                         and cfg.rope_original_max_len > 0):
    raise ConfigError(f'model.rope_scaling={kind!r} needs model.rope_original_max_len > 0 '
                      f'(the context before extension, e.g. 8192).')
  if kind == 'llama3' and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
    raise ConfigError(
        f'model.rope_low_freq_factor={cfg.rope_low_freq_factor!r} and '
        f'model.rope_high_freq_factor={cfg.rope_high_freq_factor!r} must satisfy '
        f'0 < low < high (Llama 3.1: 1.0 and 4.0).')
  if kind == 'yarn' and not (cfg.rope_beta_fast > 0 and cfg.rope_beta_slow > 0
                             and cfg.rope_attention_factor >= 0):
    raise ConfigError('model.rope_beta_fast and model.rope_beta_slow must be > 0 and '
                      'model.rope_attention_factor >= 0 (0: 0.1 * ln(factor) + 1).')


# --------------------------------------------------------------------------- model


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm Transformer block."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dims = resolved_dims(cfg)
    dtype, param_dtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
    # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * layers).
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    norm = lambda: layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dtype,
                                    param_dtype=param_dtype)
    self.attn_norm = norm()
    self.attn = Attention(
        cfg.d_model, cfg.num_heads, dims['num_kv_heads'], dims['head_dim'],
        causal=cfg.causal, use_rope=cfg.positions == 'rope',
        implementation=cfg.attention_impl, init_std=cfg.init_std, out_init_std=out_std,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=cfg.use_bias,
        projection_vjp=cfg.projection_vjp, window_choices=layer_windows(cfg))
    self.mlp_norm = norm()
    # Mixture of experts (research/models/moe.py): routed experts in `moe`; `mlp` is
    # then the shared experts (one MLP of moe_shared_experts x the expert width) or None.
    mlp_dim, moe = dims['mlp_dim'], None
    if cfg.moe_num_experts:
      expert_dim = cfg.moe_mlp_dim or dims['mlp_dim']
      mlp_dim = cfg.moe_shared_experts * expert_dim
      moe = moe_lib.MoE(
          cfg.d_model, cfg.moe_num_experts, cfg.moe_top_k, expert_dim, kind=cfg.mlp_kind,
          capacity_factor=cfg.moe_capacity_factor, norm_topk=cfg.moe_norm_topk,
          init_std=cfg.init_std, out_init_std=out_std, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs)
    self.moe = moe
    self.mlp = layers.MLP(cfg.d_model, mlp_dim, kind=cfg.mlp_kind,
                          init_std=cfg.init_std, out_init_std=out_std, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs, use_bias=cfg.use_bias,
                          projection_vjp=cfg.projection_vjp) if mlp_dim else None
    self.dropout_rate = float(cfg.dropout)

  def __call__(self, x_BLD: jax.Array, *, rope=None, mask_BL=None, segment_ids_BL=None,
               window: int | jax.Array = 0, kv_cache=None, cache_index=None,
               dropout_key: jax.Array | None = None):
    """Returns ``(x_BLD, new_kv_cache, aux)``; ``dropout_key`` None means no dropout.

    ``aux``: the MoE layer's auxiliary losses (:data:`moe.AUX_KEYS`), ``{}`` when dense.
    """
    key0 = key1 = None
    if dropout_key is not None:
      key0, key1 = jax.random.split(dropout_key)
    h_BLD, kv_cache = self.attn(self.attn_norm(x_BLD), rope=rope, mask_BL=mask_BL,
                                segment_ids_BL=segment_ids_BL, window=window,
                                kv_cache=kv_cache, cache_index=cache_index)
    x_BLD = constrain(x_BLD + _dropout(h_BLD, self.dropout_rate, key0),
                      ('batch', 'residual_seq', 'act_embed'))
    h_BLD, aux = self._feed_forward(self.mlp_norm(x_BLD))
    x_BLD = constrain(x_BLD + _dropout(h_BLD, self.dropout_rate, key1),
                      ('batch', 'residual_seq', 'act_embed'))
    return x_BLD, kv_cache, aux

  def _feed_forward(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The dense MLP, or the routed experts plus the shared ones (and their aux losses)."""
    if self.moe is None:
      return self.mlp(x_BLD), {}
    h_BLD, aux = self.moe(x_BLD)
    if self.mlp is not None:
      h_BLD = h_BLD + self.mlp(x_BLD)
    return h_BLD, aux


def _unstack_blocks(cfg: ml_collections.ConfigDict, stacked: Block) -> nnx.List:
  """Per-layer Blocks holding the slices of the scanned init.

  So ``scan_layers`` changes how the model runs, never which model it is: the same
  seed gives the same initial weights (and the same losses) either way.
  """
  values = nnx.to_pure_dict(nnx.state(stacked))
  # One abstract per-layer Block (its own, unstacked sharding metadata), traced once.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
  blocks = []
  for i in range(cfg.num_layers):
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a, i=i: a[i], values))
    blocks.append(nnx.merge(graphdef, state))
  return nnx.List(blocks)


class Transformer(nnx.Module):
  """Token ids -> logits. ``cfg`` is the config's ``model`` section (vocab resolved).

  Built under ``research.sharding.use_mesh(mesh)``, parameters are created sharded by
  their logical names. Built with no logical-axis rules active (a notebook, a unit
  test), eager sharding is switched off for the construction: parameters are plain
  single-device arrays that still carry their logical names.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    validate_model_config(cfg)
    if cfg.vocab_size <= 0:
      raise ConfigError(
          f'model.vocab_size={cfg.vocab_size} must be resolved to the tokenizer size '
          f'(> 0) before the model is built.')
    if spmd.get_logical_axis_rules():
      self._build(cfg, rngs)
    else:
      with nnx.use_eager_sharding(False):
        self._build(cfg, rngs)

  def _build(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    dims = resolved_dims(cfg)
    self.vocab_size = int(cfg.vocab_size)
    padded_vocab = padded_vocab_size(self.vocab_size)
    self.num_layers = int(cfg.num_layers)
    self.num_kv_heads = dims['num_kv_heads']
    self.head_dim = dims['head_dim']
    self.max_seq_len = int(cfg.max_seq_len)
    self.positions = cfg.positions
    self.rope_theta = float(cfg.rope_theta)
    self.rope_scaling = RopeScaling.from_config(cfg)
    self.layer_windows = layer_windows(cfg)
    self.causal = bool(cfg.causal)
    self.tie_embeddings = bool(cfg.tie_embeddings)
    self.scan_layers = bool(cfg.scan_layers)
    # How many scanned layers one loop iteration runs; 0: all of them, straight-line
    # code over the same stacked parameters (research/backend_defaults.py, CPU).
    self.scan_unroll = 0 if cfg.scan_unroll >= cfg.num_layers else int(cfg.scan_unroll)
    self.remat = cfg.remat
    # Used when the mesh has a 'stage' axis > 1 (research/models/pipeline.py). A tuple:
    # static module attributes are hashed into the graph definition (a dict is not).
    self.pipeline = (('microbatches', int(cfg.get('pipeline_microbatches', 0))),
                     ('schedule', str(cfg.get('pipeline_schedule', 'gpipe'))),
                     ('repeats', int(cfg.get('pipeline_repeats', 0))))
    self.dropout_rate = float(cfg.dropout)
    self.dtype = layers.to_dtype(cfg.dtype)
    param_dtype = layers.to_dtype(cfg.param_dtype)
    common = dict(init_std=cfg.init_std, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

    self.embed = layers.token_embedding(padded_vocab, cfg.d_model, **common)
    if cfg.positions == 'learned':
      self.pos_embed = layers.position_embedding(cfg.max_seq_len, cfg.d_model, **common)
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def create_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=rngs)

    self.blocks = create_blocks(rngs)
    if not cfg.scan_layers:
      self.blocks = _unstack_blocks(cfg, self.blocks)
    self.final_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps,
                                       dtype=self.dtype, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.unembed = layers.output_head(cfg.d_model, padded_vocab, **common)
    # Dropout randomness lives in the model state (RngKey + RngCount), so it is
    # checkpointed and advances each training step.
    self.dropout_rngs = (nnx.Rngs(dropout=rngs.dropout()) if cfg.dropout > 0
                         else nnx.data(None))

  # ------------------------------------------------------------------ pieces

  def _apply_blocks(self, x_BLD, *, rope, mask_BL, segment_ids_BL, cache: KVCache | None,
                    layer_keys: jax.Array | None):
    index = None if cache is None else cache['index']
    kv = None if cache is None else (cache['k'], cache['v'])
    # One window for all layers stays a static int (cuDNN takes it as is); per-layer
    # windows ride along the layers as an int32 array (traced under scan).
    uniform = len(set(self.layer_windows)) == 1
    static_window = self.layer_windows[0] if uniform else 0
    windows = None if uniform else jnp.asarray(self.layer_windows, jnp.int32)

    def apply_block(block: Block, x_BLD, key, layer_kv, window, side):
      rope, mask_BL, segment_ids_BL = side  # Per micro-batch under a pipeline.
      return block(x_BLD, rope=rope, mask_BL=mask_BL, segment_ids_BL=segment_ids_BL,
                   window=static_window if window is None else window,
                   kv_cache=layer_kv, cache_index=index, dropout_key=key)

    if self.remat != 'none':
      # Under a rolled scan, CSE across iterations is impossible anyway: prevent_cse=False
      # lets XLA optimise more (the JAX docs' recommendation); unrolled, it is needed.
      rolled = self.scan_layers and self.scan_unroll == 1
      apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.remat],
                              prevent_cse=not rolled)

    side = (rope, mask_BL, segment_ids_BL)

    def run_stack(blocks, x_BLD, layer_keys, kv, windows, side):
      @nnx.scan(in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                unroll=self.scan_unroll or True, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def scan_blocks(block, x_BLD, key, layer_kv, window):
        # Named for the pipeline's rematerialisation policy; a no-op otherwise.
        x_BLD = checkpoint_name(x_BLD, pipeline.LAYER_INPUT)
        x_BLD, layer_kv, aux = apply_block(block, x_BLD, key, layer_kv, window, side)
        return x_BLD, (layer_kv, aux)  # MoE aux losses stacked over the layers.
      return scan_blocks(blocks, x_BLD, layer_keys, kv, windows)

    stages = pipeline.active_stages()
    if stages > 1 and cache is None:  # Decoding (a KV cache) runs the plain scan.
      x_BLD, aux = self._pipelined(run_stack, x_BLD, windows, side, stages,
                                   layer_keys is not None)
      return x_BLD, None, aux
    if self.scan_layers:
      x_BLD, (new_kv, aux) = run_stack(self.blocks, x_BLD, layer_keys, kv, windows, side)
      return x_BLD, new_kv, {k: jnp.mean(v) for k, v in aux.items()}

    new_k, new_v, auxes = [], [], []
    for i, block in enumerate(self.blocks):
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      key = None if layer_keys is None else layer_keys[i]
      window = None if windows is None else windows[i]
      x_BLD, layer_kv, aux = apply_block(block, x_BLD, key, layer_kv, window, side)
      auxes.append(aux)
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
    aux = {k: jnp.mean(jnp.stack([a[k] for a in auxes])) for k in auxes[0]}  # Layer mean.
    return x_BLD, (None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))), aux

  def _pipelined(self, run_stack, x_BLD, windows, side, stages: int, dropout: bool):
    """The block stack through the ``stage`` mesh axis (research/models/pipeline.py).

    Returns ``(x_BLD, aux)``; MoE aux losses are the mean over layers and micro-batches
    (each micro-batch's own routing statistics, as under gradient accumulation).
    """
    if not self.scan_layers or dropout:
      what = 'model.scan_layers=False' if not self.scan_layers else 'model.dropout > 0'
      raise ConfigError(f'mesh.stage={stages} (pipeline parallelism) does not support '
                        f'{what}; set mesh.stage=1 or change that key.')
    schedule = pipeline.resolve(stages, num_layers=self.num_layers, **dict(self.pipeline))
    batch_spec, shards = None, 1
    rules = spmd.get_logical_axis_rules()
    if rules:
      from research.sharding import logical_to_mesh_spec
      batch_spec = logical_to_mesh_spec(('batch',), rules)[0]
      sizes = dict(jax.sharding.get_abstract_mesh().shape)
      shards = math.prod(sizes[a] for a in (
          (batch_spec,) if isinstance(batch_spec, str) else batch_spec or ()))
    if x_BLD.shape[0] % (schedule.microbatches * shards):
      # A batch that does not split into micro-batches per data shard (downstream
      # scoring, an odd eval batch; validation keeps training batches divisible): the
      # plain scan, with the stage-split weights gathered by XLA.
      x_BLD, (_, aux) = run_stack(self.blocks, x_BLD, None, None, windows, side)
      return x_BLD, {k: jnp.mean(v) for k, v in aux.items()}
    graphdef, block_state = nnx.split(self.blocks)

    def stage_fn(stage_layers, x_bLD, side_b):
      stage_state, stage_windows = stage_layers
      blocks = nnx.merge(graphdef, stage_state)
      out, (_, aux) = run_stack(blocks, x_bLD, None, None, stage_windows, side_b)
      return out, {k: jnp.sum(v, axis=0) for k, v in aux.items()}  # Over the stage's layers.

    spec = jax.sharding.PartitionSpec(batch_spec, jax.sharding.PartitionSpec.UNCONSTRAINED,
                                      jax.sharding.PartitionSpec.UNCONSTRAINED)
    x_BLD, aux = pipeline.run(stage_fn, (block_state, windows), x_BLD, side, schedule,
                              remat_policy=REMAT_POLICIES[self.remat], activation_spec=spec)
    count = self.num_layers * schedule.microbatches
    return x_BLD, {k: v / count for k, v in aux.items()}

  def logits(self, x_BLD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> logits ``[B, L, V]`` in the compute dtype."""
    if self.tie_embeddings:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = self.unembed(x_BLD)
    logits_BLV = constrain(logits_BLV, ('batch', 'seq', 'act_vocab'))
    return logits_BLV[..., :self.vocab_size]  # Drop the padding rows' logits.

  # ------------------------------------------------------------------ API

  def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
               cache: KVCache | None = None, deterministic: bool = True,
               return_hidden: bool = False, mask_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None, return_aux: bool = False):
    """Logits ``[B, L, V]`` in the compute dtype (the loss upcasts to float32).

    Args:
      tokens_BL: int token ids.
      positions_BL: positions for RoPE / learned embeddings; default ``arange(L)``,
        offset by the cache index when decoding.
      cache: from :meth:`init_cache`; then returns ``(out, new_cache)`` with the new
        keys/values written at ``cache['index']`` and the index advanced by ``L``.
      deterministic: False enables dropout (``model.dropout > 0``).
      return_hidden: return the final-normed hidden states ``[B, L, D]`` instead of
        logits (for classification heads).
      mask_BL: 1 = real token, 0 = padding; padded keys get no attention (bidirectional
        encoders with padded batches). Not supported together with ``cache``.
      segment_ids_BL: int32 document ids of packed windows: tokens attend only within
        their segment (0 = packing padding). Pass ``positions_BL`` from
        :func:`research.models.attention.document_positions` for positions that
        restart per document. Not supported together with ``cache``.
      return_aux: return ``(out, aux)``: the mixture-of-experts layers' auxiliary
        losses (``moe.AUX_KEYS``, float32 means over the layers; ``{}`` when dense).
        Not supported together with ``cache``.
    """
    B, L = tokens_BL.shape
    index = None if cache is None else cache['index']
    if positions_BL is None:
      start = 0 if index is None else index
      positions_BL = jnp.broadcast_to(start + jnp.arange(L, dtype=jnp.int32), (B, L))
    # Context parallelism, causal: the load-balanced (zigzag) sequence order inside the
    # blocks; the hidden states are put back in order before the head.
    zigzag = cache is None and context_parallel.uses_zigzag(L, self.causal)
    if zigzag:
      tokens_BL, positions_BL, mask_BL, segment_ids_BL = context_parallel.to_zigzag(
          tokens_BL, positions_BL, mask_BL, segment_ids_BL)

    keys = None
    if not deterministic and self.dropout_rngs is not None:
      keys = jax.random.split(self.dropout_rngs.dropout(), self.num_layers + 1)

    x_BLD = self.embed(tokens_BL)
    if self.positions == 'learned':
      x_BLD = x_BLD + self.pos_embed(positions_BL)
    x_BLD = _dropout(x_BLD, self.dropout_rate, None if keys is None else keys[0])
    x_BLD = constrain(x_BLD, ('batch', 'residual_seq', 'act_embed'))
    rope = None
    if self.positions == 'rope':
      inv_freq, scale = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
      rope = rope_angles(positions_BL, inv_freq, scale)

    with context_parallel.layout(zigzag):
      x_BLD, new_kv, aux = self._apply_blocks(x_BLD, rope=rope, mask_BL=mask_BL,
                                              segment_ids_BL=segment_ids_BL, cache=cache,
                                              layer_keys=None if keys is None else keys[1:])
    if zigzag:
      x_BLD = context_parallel.from_zigzag(x_BLD)
    x_BLD = self.final_norm(x_BLD)
    out = x_BLD if return_hidden else self.logits(x_BLD)
    if cache is None:
      return (out, aux) if return_aux else out
    return out, {'k': new_kv[0], 'v': new_kv[1], 'index': index + L}

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """Empty cache: ``k``, ``v`` ``[layers, B, max_len, kv_heads, head_dim]``, index 0.

    ``dtype`` defaults to the compute dtype.
    """
    shape = (self.num_layers, batch_size, max_len, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
            'index': jnp.zeros((), jnp.int32)}


# --------------------------------------------------------------------------- counting


def count_params(model: nnx.Module) -> dict[str, int]:
  """``total``, ``embedding``, ``non_embedding``, ``active`` and ``active_non_embedding``.

  ``embedding`` counts only lookup tables that do no matmul: the learned position
  table, and the token table when the output head is untied. A tied token table is
  also the output projection, so it counts as non-embedding (nanoGPT's convention),
  which makes ``6 * non_embedding`` include the output layer's FLOPs for MFU.
  Vocabulary padding rows (:data:`VOCAB_PAD_MULTIPLE`) are not counted.
  ``active*``: what one token's forward pass multiplies with: a mixture-of-experts
  layer's routed experts count ``top_k / num_experts`` of their weights (the router
  and shared experts in full), so ``6 * active_non_embedding`` is the MoE's 6N.
  Equal to ``total`` / ``non_embedding`` for a dense model.
  """
  total = embedding = inactive = 0
  vocab = getattr(model, 'vocab_size', None)
  moe_share = next((m.top_k / m.num_experts for _, m in nnx.iter_modules(model)
                    if isinstance(m, moe_lib.MoE)), 1.0)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = int(math.prod(var.shape))
    top = str(path[0])
    if vocab and top in ('embed', 'unembed'):
      n = n // padded_vocab_size(vocab) * vocab
    total += n
    if top == 'pos_embed' or (top == 'embed' and not getattr(model, 'tie_embeddings', True)):
      embedding += n
    names = [str(p) for p in path]
    if 'moe' in names and names[-1] in ('wi_0', 'wi_1', 'wi', 'wo'):  # Routed experts.
      inactive += n - round(n * moe_share)
  return {'total': total, 'embedding': embedding, 'non_embedding': total - embedding,
          'active': total - inactive, 'active_non_embedding': total - embedding - inactive}
