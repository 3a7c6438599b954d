"""Config schema: every key, its default, argument parsing and validation.

Experiment files (``experiments/**.py``) start from :func:`base_config` and override
values; they never add keys. Every key a run can read is declared here, so a typo on
the command line (``--config.modle.d_model=...``) fails before anything is compiled.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from research.runtime import UserError


class ConfigError(UserError, ValueError):
  """A config value is wrong. The message names the key and the fix (one line)."""


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults. Experiment configs override, never add."""
  c = ml_collections.ConfigDict()
  c.name = 'run'
  c.task = 'lm'  # 'lm' (pretraining); fine-tuning tasks register more.
  c.seed = 0
  c.steps = 1000
  c.batch_size = 32  # Global, in sequences.
  c.seq_len = 256
  c.log_every = 10
  c.log_every_s = 60.0  # Also print a progress line when this many seconds passed.
  c.eval_every = 200
  c.eval_steps = 10
  c.eval_tokens = 0  # 0: the first eval_steps batches; -1: the whole eval split; N>0: N tokens.
  c.eval_tasks = ''  # Downstream tasks scored at each eval (research/downstream), e.g. 'stdlib_mc'.
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.num_samples = 3  # Decoded at the end of pretraining.
  c.sample_len = 200
  c.sample_temperature = 0.8
  c.sample_top_k = 40
  c.sample_prompt = 'def '

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.vocab_size = 0  # 0: the tokenizer's vocabulary size.
  m.d_model = 128
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: same as num_heads (MHA); 1: MQA; else GQA.
  m.head_dim = 0  # 0: d_model // num_heads.
  m.mlp_kind = 'swiglu'  # 'swiglu' | 'gelu'
  m.mlp_dim = 0  # 0: 4*d_model for gelu, 8/3*d_model rounded to 64 for swiglu.
  m.norm = 'rmsnorm'  # 'rmsnorm' | 'layernorm'
  m.norm_eps = 1e-6
  m.positions = 'rope'  # 'rope' | 'learned'
  m.rope_theta = 10000.0
  m.rope_scaling = 'none'  # 'none' | 'linear' | 'llama3' | 'yarn' (transformers' RoPE types).
  m.rope_factor = 1.0  # linear/llama3/yarn: context extension factor (Llama 3.1: 8.0).
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths above original_max_len / this are scaled.
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths below original_max_len / this are kept.
  m.rope_original_max_len = 0  # llama3/yarn: original_max_position_embeddings (pre-extension).
  m.rope_beta_fast = 32.0  # yarn: rotations bounding the extrapolated dimensions.
  m.rope_beta_slow = 1.0  # yarn: rotations bounding the interpolated dimensions.
  m.rope_attention_factor = 0.0  # yarn: cos/sin scale; 0 = 0.1 * ln(factor) + 1.
  m.rope_truncate = True  # yarn: integer correction range (transformers' default).
  m.sliding_window = 0  # Keys a query sees in local layers (itself included); 0: full.
  m.window_layers = ''  # 'L' local / 'G' global per layer, repeated ('LG': alternate); '': all.
  m.max_seq_len = 1024
  m.tie_embeddings = True
  m.dropout = 0.0
  m.dtype = 'float32'  # Compute dtype: 'float32' | 'bfloat16'.
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.scan_unroll = 1  # Scanned layers per loop iteration; 0: all (straight-line code, same params).
  m.remat = 'none'  # 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'
  # Pipeline parallelism (mesh.stage > 1; research/models/pipeline.py; needs scan_layers).
  m.pipeline_microbatches = 0  # Micro-batches per step through the stages; 0: mesh.stage.
  m.pipeline_schedule = 'gpipe'  # 'gpipe' | 'circular' (each stage holds several chunks).
  m.pipeline_repeats = 0  # circular: trips round the stages; 0: num_layers / mesh.stage.
  m.causal = True  # False: bidirectional encoder.
  m.init_std = 0.02
  m.attention_impl = 'xla'  # 'xla' | 'cudnn' (jax.nn.dot_product_attention implementation)
  # Backward of the attention/MLP projections: 'autodiff' | 'transpose_input' (custom VJP
  # that transposes the activation instead of the gradient; faster on CPU, not with QAT).
  m.projection_vjp = 'autodiff'
  m.use_bias = False  # Biases on attention and MLP projections (GPT-2 import).
  # Mixture of experts (research/models/moe.py; README "Mixture of experts").
  m.moe_num_experts = 0  # Routed experts in every block's feed-forward; 0: dense MLP.
  m.moe_top_k = 2  # Experts each token is routed to (1..moe_num_experts).
  m.moe_mlp_dim = 0  # Hidden width of each expert (and shared expert); 0: mlp_dim.
  m.moe_shared_experts = 0  # Always-active experts beside the routed ones (DeepSeekMoE).
  # 0: dropless (grouped ragged_dot matmuls); > 0: each expert takes at most
  # ceil(cf * tokens * top_k / experts) of a device's tokens, the rest are dropped.
  m.moe_capacity_factor = 0.0
  m.moe_norm_topk = True  # Top-k router probabilities renormalised to sum to 1 (Mixtral).
  m.moe_lb_loss = 0.01  # Weight of the load-balancing loss (Switch; 1.0 when balanced).
  m.moe_z_loss = 0.001  # Weight of the router z-loss (ST-MoE: mean logsumexp(logits)^2).

  c.loss = ml_collections.ConfigDict()
  c.loss.z_loss = 0.0  # Weight of the z-loss (log Z)^2 term; PaLM uses 1e-4.
  c.loss.chunk_size = 0  # >0: loss over sequence chunks; float32 logits never whole.

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = 'stdlib'  # 'stdlib' | 'text_files' | 'jsonl' | 'parquet' | 'tfds' | 'tokens'
  d.path = ''  # Glob for text_files/jsonl/parquet; a launch.prepare_data store for tokens.
  d.name = ''  # TFDS dataset name, e.g. 'tiny_shakespeare'.
  d.text_key = 'text'  # TFDS feature / JSONL field / Parquet column holding the text.
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.eval_fraction = 0.05  # File sources: fraction of files held out, by path hash.
  d.tokenizer = 'bytes'  # 'bytes' | 'sentencepiece'
  d.spm_vocab_size = 1024  # SentencePiece vocabulary trained on the corpus.
  d.spm_train_chars = 5_000_000  # Characters of the corpus used to train it.
  d.tfds_data_dir = ''
  d.num_workers = 0  # grain worker processes.
  d.document_masking = False  # Batches carry segment_ids/positions: attend within a document.
  d.cache_dir = ''  # Where raw sources' token stores go; '': ~/.cache/research/tokens.
  d.prepare_workers = 0  # Processes tokenizing a raw source into its store; 0: all CPUs.

  c.optimizer = ml_collections.ConfigDict()
  o = c.optimizer
  o.name = 'adamw'  # 'adamw' | 'adafactor' | 'lion' | 'sgd' | 'muon'
  o.learning_rate = 3e-3
  o.schedule = 'cosine'  # 'cosine' | 'constant' | 'linear' | 'inverse_sqrt' | 'wsd'
  o.warmup_steps = 100
  o.decay_steps = 0  # 0: steps.
  o.min_lr_ratio = 0.1  # Floor of the decay as a fraction of the peak.
  o.wsd_decay_fraction = 0.2  # wsd: the final fraction of the steps spent decaying.
  o.wsd_decay_shape = 'linear'  # wsd: 'linear' | 'cosine' | 'sqrt' (1 - sqrt).
  o.momentum = 0.9  # sgd.
  o.frozen_regex = ''  # Params matching get no update and no optimizer state.
  o.lr_multipliers = ()  # ((regex, multiplier), ...): first match scales the update.
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.no_decay_regex = r'(norm|bias|embed|scale)'  # Params matching get no decay.
  o.clip_norm = 1.0  # 0: no clipping.
  o.grad_accum_steps = 1

  # Batch-size ramp (research/batch_ramp.py): steps 1..boundaries[0] use batch_sizes[0]
  # sequences, ..., steps after boundaries[-1] use batch_size. The LR is declared for
  # batch_size and multiplied by (b / batch_size)^{0, 1, 1/2} for lr_scaling
  # 'none' | 'linear' | 'sqrt'. Empty tuples: no ramp.
  c.batch_ramp = ml_collections.ConfigDict()
  c.batch_ramp.boundaries = ()
  c.batch_ramp.batch_sizes = ()
  c.batch_ramp.lr_scaling = 'none'

  # What to do when the loss or a gradient is not finite: 'stop' (exit 1 naming the
  # step and the first non-finite parameter) or 'skip' (drop that update, count it).
  c.nan_policy = 'stop'
  c.resume_check = True  # False: resume even if model/tokenizer/data/batch changed (warns).

  # Optional Weights & Biases logging (research/wandb_writer.py; pip install wandb).
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''  # '': off.
  c.wandb.mode = 'offline'  # 'offline' (WORKDIR/wandb, no network) | 'online' | 'disabled'.
  c.wandb.entity = ''
  c.wandb.run_name = ''  # '': the workdir's name.
  c.wandb.dir = ''  # '': WORKDIR/wandb.
  # True: execution choices by backend (research/backend_defaults.py; on CPU: the
  # projections' transpose_input backward, unrolled layer scan, cache-sized micro-batches;
  # the same update up to float rounding). False: model.*/optimizer.* run as written.
  c.backend_defaults = True

  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nan_at_step = 0  # Fault injection (tests): NaN gradients at this step.
  c.debug.inject_nan_regex = ''  # ... only for parameters whose path matches.
  c.debug.sigkill_after_save_step = 0  # Fault injection: kill -9 itself mid-save.

  # Fine-tuning (research/finetune/, README "Fine-tuning"). With init_from set, the
  # backbone architecture (model.* shape keys) and the tokenizer come from the source.
  c.finetune = ml_collections.ConfigDict()
  f = c.finetune
  f.init_from = ''  # '' (from scratch) | a run's workdir or checkpoints dir | an HF dir.
  f.init_step = -1  # Checkpoint step to load from a workdir; -1: the latest.
  f.pretrain_config = ''  # 'FILE[:arg]': pretrain into init_from first if it is not done.
  f.pretrain_overrides = ()  # ((dotted_key, value), ...) for that pretraining run.
  # True: data.eval_fraction := the source run's, so this run evaluates only on files the
  # source held out (same corpus). False: a larger fraction is warned about (overlap).
  f.match_source_split = False
  f.mode = 'full'  # 'full' | 'lora' | 'linear_probe' (frozen backbone, head only).
  f.lora_rank = 8
  f.lora_alpha = 16.0  # Update scale alpha / rank.
  f.lora_dropout = 0.0  # Dropout on the adapters' input (training only).
  f.lora_targets = r'attn/(query|key|value|out)|mlp/(wi_0|wi_1|wi|wo)'  # Module-path regex.
  f.pooling = 'last'  # Classification: 'last' (last real token) | 'mean' | 'first'.
  f.num_classes = 0  # 0: from the data.
  f.label_key = 'label'  # TFDS feature holding the class id.
  f.max_classes = 12  # stdlib functions task: the K modules with the most functions.
  f.max_train_per_class = 400  # stdlib functions task: caps, for balanced classes.
  f.max_eval_per_class = 100
  f.prompt_key = 'prompt'  # SFT: fields of JSONL / TFDS examples.
  f.response_key = 'response'

  # Quantization (research/quant.py, README "Quantization"): qwix rules over module paths.
  # mode 'qat' trains with fake-quantized matmuls (from scratch, or from a float run with
  # init_from); 'ptq' quantizes init_from's checkpoint without training (launch.quantize).
  c.quant = ml_collections.ConfigDict()
  q = c.quant
  q.mode = 'none'  # 'none' | 'qat' | 'ptq'
  q.weight_bits = 8  # 8 | 4 | 2
  q.act_bits = 0  # 0 (float activations, weights-only) | 8 | 4
  q.granularity = 'channel'  # Weight scales: 'channel' | 'tensor' | 'group' (group_size).
  q.group_size = 32  # 'group': elements sharing a scale along the contraction axis.
  q.symmetric = True  # False: asymmetric weights (min/max + zero point); bits 8 or 4.
  q.clip_ratio = 1.0  # Weight range = clip_ratio x abs-max (min/max); < 1 clips outliers.
  # Module paths (fullmatch) whose matmuls are quantized; embeddings/head excluded.
  # MoE experts count as the modules blocks/moe/{wi_0,wi_1,wi,wo} (research/quant/qat.py).
  q.targets = r'(.*/)?(attn/(query|key|value|out)|mlp/(wi_0|wi_1|wi|wo)|moe/(wi_0|wi_1|wi|wo))'
  # A float run's workdir (or its checkpoints/) whose weights start QAT fine-tuning
  # (mode 'qat'), PTQ (mode 'ptq') or float continued training (mode 'none', the QAT
  # fine-tuning baseline); optimizer state starts fresh. Relative: to --workdir's parent.
  q.init_from = ''

  # Compression (research/compress/, README "Compression"): knowledge distillation from a
  # frozen teacher run, and pruning with masks kept in the model state.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ''  # '' (off) | a run's workdir (relative: to --workdir's parent) | HF dir.
  c.distill.teacher_step = -1  # Teacher checkpoint step; -1: the latest.
  c.distill.teacher_config = ''  # 'FILE[:arg]': train the teacher into distill.teacher first.
  c.distill.alpha = 0.5  # loss = (1 - alpha) * hard CE + alpha * T^2 * KL(teacher_T || student_T).
  c.distill.temperature = 2.0
  c.prune = ml_collections.ConfigDict()
  c.prune.method = 'none'  # 'none' | 'magnitude' | 'nm' (N:M, e.g. 2:4) | 'structured'
  c.prune.sparsity = 0.5  # Final sparsity (magnitude: of each kernel; structured: of heads/neurons).
  c.prune.initial_sparsity = 0.0  # Zhu & Gupta s_i at begin_step.
  c.prune.begin_step = 1  # First mask update (t0).
  c.prune.end_step = 0  # Last update (t0 + n*dt); 0: one-shot at begin_step.
  c.prune.frequency = 10  # Steps between mask updates (dt).
  c.prune.n = 2  # N:M: keep n of every m consecutive weights along the input dim.
  c.prune.m = 4
  c.prune.structure = 'both'  # structured: 'heads' | 'mlp' | 'both'.
  c.prune.targets = r'(.*/)?(attn/(query|key|value|out)|mlp/(wi_0|wi_1|wi|wo))'  # Module paths.

  c.mesh = ml_collections.ConfigDict()  # See research/sharding.py and README "Scaling".
  c.mesh.data = -1  # Data parallelism. -1: all remaining devices (one axis at most).
  c.mesh.fsdp = 1  # FSDP/ZeRO-3: weights and optimizer state split on 'embed'.
  c.mesh.tensor = 1  # Megatron tensor parallelism: heads, MLP width, vocabulary.
  c.mesh.sequence = 1  # Context parallelism: sequences (batch, activations, weights) split N ways.
  c.mesh.context_parallel = 'ring'  # Attention when mesh.sequence > 1: 'ring' | 'all_gather' (K/V).
  c.mesh.sequence_parallel = False  # Megatron SP: residual stream split over 'tensor' along L.
  c.mesh.expert = 1  # Expert parallelism: MoE experts (and the batch) split N ways.
  c.mesh.stage = 1  # Pipeline stages: the layer stack split into consecutive blocks.
  c.mesh.dcn_data = 1  # Slices (or processes) the data axis spans over the slow network.
  c.mesh.rules = ''  # 'logical=mesh_axis,...' overriding sharding.DEFAULT_RULES ('embed=none').
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``'k=v,k2=v2'`` (or a bare word ``'k'`` meaning ``k=True``) with types.

  Types come from ``defaults``: ``parse_arg('smoke=True', smoke=False)``. A key not
  in ``defaults`` is an error naming the allowed keys.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, sep, raw = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f'config arg {key!r} is unknown; allowed: {sorted(defaults)}.')
    if not sep:
      value: Any = True
    else:
      want = type(defaults[key])
      if want is bool:
        if raw.lower() not in ('true', 'false', '1', '0'):
          raise ConfigError(f'config arg {key!r} must be True or False, got {raw!r}.')
        value = raw.lower() in ('true', '1')
      elif want in (int, float):
        try:
          value = want(raw)
        except ValueError:
          raise ConfigError(
              f'config arg {key!r} must be {want.__name__}, got {raw!r}.') from None
      elif want is str:
        value = raw
      else:
        value = ast.literal_eval(raw)
    out[key] = value
  return out


def override(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted keys (``{'model.d_model': 64}``); unknown keys are an error."""
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise ConfigError(f'config key {dotted!r} is unknown: no section {p!r}.')
      node = node[p]
    if leaf not in node:
      raise ConfigError(
          f'config key {dotted!r} is unknown; keys of that section: {sorted(node.keys())}.')
    node[leaf] = value


def check_known_keys(config: ml_collections.ConfigDict,
                     reference: ml_collections.ConfigDict | None = None,
                     prefix: str = '') -> None:
  """Fails on a key the schema does not declare (a typo in an experiment file)."""
  reference = reference if reference is not None else base_config()
  for key in config.keys():
    dotted = f'{prefix}{key}'
    if key not in reference:
      raise ConfigError(
          f'config key {dotted!r} is unknown; did you mean one of '
          f'{sorted(reference.keys())} (declared in research/config.py)?')
    if isinstance(config[key], ml_collections.ConfigDict):
      check_known_keys(config[key], reference[key], prefix=f'{dotted}.')


# Choices of the feature sections (checked by research/feature_validation.py).
QUANT_MODES = ('none', 'qat', 'ptq')
QUANT_GRANULARITIES = ('channel', 'tensor', 'group')
QUANT_BITS = {8: 'int8', 4: 'int4', 2: 'int2'}
FINETUNE_MODES = ('full', 'lora', 'linear_probe')
POOLINGS = ('last', 'mean', 'first')
PRUNE_METHODS = ('none', 'magnitude', 'nm', 'structured')
PRUNE_STRUCTURES = ('heads', 'mlp', 'both')
DISTILL_TASKS = ('lm', 'classification')
