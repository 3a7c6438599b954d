"""Config schema: every key, its default, argument parsing and validation.

Experiment files (``experiments/**.py``) start from :func:`base_config` and override
values; they never add keys. Every key a run can read is declared here, so a typo on
the command line (``--config.modle.d_model=...``) fails before anything is compiled.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


class ConfigError(ValueError):
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
  c.eval_every = 200
  c.eval_steps = 10
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
  m.max_seq_len = 1024
  m.tie_embeddings = True
  m.dropout = 0.0
  m.dtype = 'float32'  # Compute dtype: 'float32' | 'bfloat16'.
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.remat = 'none'  # 'none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable'
  m.causal = True  # False: bidirectional encoder.
  m.init_std = 0.02
  m.attention_impl = 'xla'  # 'xla' | 'cudnn' (jax.nn.dot_product_attention implementation)

  c.loss = ml_collections.ConfigDict()
  c.loss.z_loss = 0.0  # Weight of the z-loss (log Z)^2 term; PaLM uses 1e-4.

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = 'stdlib'  # 'stdlib' | 'text_files' | 'tfds'
  d.path = ''  # Glob for text_files.
  d.name = ''  # TFDS dataset name, e.g. 'tiny_shakespeare'.
  d.text_key = 'text'  # TFDS feature holding the text.
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.eval_fraction = 0.05  # stdlib/text_files: fraction of files held out, by path hash.
  d.tokenizer = 'bytes'  # 'bytes' | 'sentencepiece'
  d.spm_vocab_size = 1024  # SentencePiece vocabulary trained on the corpus.
  d.spm_train_chars = 5_000_000  # Characters of the corpus used to train it.
  d.tfds_data_dir = ''
  d.num_workers = 0  # grain worker processes.

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

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
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
