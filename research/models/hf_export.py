"""Export a language model of ours to a Hugging Face directory (no custom code needed).

  python -m launch.export_hf --workdir=RUN --out=DIR [--step=N]

``DIR`` gets ``config.json``, ``model.safetensors`` (float32), ``generation_config.json``
and, for the byte tokenizer, ``tokenizer.json`` + ``tokenizer_config.json``, so
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it.

Architectures that map (anything else is refused in one line, :class:`HFExportError`):

* Llama style (RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA, tied or untied head; biases via
  ``attention_bias``/``mlp_bias``; RoPE scaling ``linear``/``llama3``/``yarn``) ->
  ``LlamaForCausalLM``. With one sliding window on every layer -> ``MistralForCausalLM``;
  with a per-layer window pattern -> ``Qwen2ForCausalLM`` (``layer_types``; its q/k/v
  biases written as zeros). Windowed models need ``use_bias=False``.
* GPT-2 style (learned positions, LayerNorm, tanh-GELU MLP, biases (zeros when the
  run has none), tied head, MHA) -> ``GPT2LMHeadModel``.

The byte tokenizer (pad, bos, eos, then byte ``b`` -> id ``b + 3``) becomes a
``tokenizers`` BPE model with no merges over the GPT-2 byte-to-unicode alphabet: every
UTF-8 byte is one token with our id, so ids round-trip exactly. SentencePiece runs get
no tokenizer files (the limitation is written to the summary and the log).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research.config import ConfigError
from research.models.transformer import layer_windows, resolved_dims


class HFExportError(ConfigError):
  """The run cannot be written as a Hugging Face model; says why (one line)."""


# --------------------------------------------------------------------------- config


def _rope_parameters(m: ml_collections.ConfigDict) -> dict[str, Any]:
  params: dict[str, Any] = {'rope_type': 'default', 'rope_theta': float(m.rope_theta)}
  if m.rope_scaling == 'none':
    return params
  params.update(rope_type=m.rope_scaling, factor=float(m.rope_factor))
  if m.rope_scaling == 'llama3':
    params.update(low_freq_factor=float(m.rope_low_freq_factor),
                  high_freq_factor=float(m.rope_high_freq_factor),
                  original_max_position_embeddings=int(m.rope_original_max_len))
  if m.rope_scaling == 'yarn':
    params.update(original_max_position_embeddings=int(m.rope_original_max_len),
                  beta_fast=float(m.rope_beta_fast), beta_slow=float(m.rope_beta_slow),
                  truncate=bool(m.rope_truncate))
    if m.rope_attention_factor:
      params['attention_factor'] = float(m.rope_attention_factor)
  return params


def architecture(m: ml_collections.ConfigDict) -> str:
  """'llama' | 'mistral' | 'qwen2' | 'gpt2' for a ``model`` config, or HFExportError."""
  if not m.causal:
    raise HFExportError('model.causal=False (a bidirectional encoder) has no causal-LM '
                        'Hugging Face class to export to.')
  dims = resolved_dims(m)
  llama = (m.positions, m.norm, m.mlp_kind) == ('rope', 'rmsnorm', 'swiglu')
  gpt2 = (m.positions, m.norm, m.mlp_kind) == ('learned', 'layernorm', 'gelu')
  if llama:
    windows = set(layer_windows(m))
    if windows == {0}:
      return 'llama'
    if m.use_bias:
      raise HFExportError('model.sliding_window with model.use_bias=True does not map '
                          '(Mistral has no biases, Qwen2 only q/k/v biases).')
    return 'mistral' if len(windows) == 1 else 'qwen2'
  if gpt2:
    if m.sliding_window:
      raise HFExportError('model.sliding_window does not map onto GPT-2 (full attention).')
    if not m.tie_embeddings:
      raise HFExportError('GPT-2 ties its output head; model.tie_embeddings=False does '
                          'not map.')
    if dims['num_kv_heads'] != m.num_heads or dims['head_dim'] * m.num_heads != m.d_model:
      raise HFExportError('GPT-2 needs num_kv_heads = num_heads and head_dim = d_model / '
                          'num_heads.')
    return 'gpt2'
  raise HFExportError(
      f'model (positions={m.positions!r}, norm={m.norm!r}, mlp_kind={m.mlp_kind!r}) maps '
      f"to no Hugging Face class: export needs Llama style ('rope', 'rmsnorm', 'swiglu') "
      f"or GPT-2 style ('learned', 'layernorm', 'gelu').")


def hf_config(m: ml_collections.ConfigDict, *, bos_id: int | None, eos_id: int | None,
              pad_id: int | None) -> dict[str, Any]:
  """The ``config.json`` of the exported model."""
  arch = architecture(m)
  dims = resolved_dims(m)
  ids = {'bos_token_id': bos_id, 'eos_token_id': eos_id, 'pad_token_id': pad_id}
  if arch == 'gpt2':
    return {
        'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
        'vocab_size': int(m.vocab_size), 'n_positions': int(m.max_seq_len),
        'n_embd': int(m.d_model), 'n_layer': int(m.num_layers), 'n_head': int(m.num_heads),
        'n_inner': dims['mlp_dim'], 'activation_function': 'gelu_new',
        'layer_norm_epsilon': float(m.norm_eps), 'resid_pdrop': 0.0, 'embd_pdrop': 0.0,
        'attn_pdrop': 0.0, 'scale_attn_weights': True, 'tie_word_embeddings': True,
        'dtype': 'float32', **ids}
  cls = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
         'qwen2': 'Qwen2ForCausalLM'}[arch]
  out = {
      'architectures': [cls], 'model_type': arch, 'vocab_size': int(m.vocab_size),
      'hidden_size': int(m.d_model), 'intermediate_size': dims['mlp_dim'],
      'num_hidden_layers': int(m.num_layers), 'num_attention_heads': int(m.num_heads),
      'num_key_value_heads': dims['num_kv_heads'], 'head_dim': dims['head_dim'],
      'hidden_act': 'silu', 'max_position_embeddings': int(m.max_seq_len),
      'rms_norm_eps': float(m.norm_eps), 'tie_word_embeddings': bool(m.tie_embeddings),
      'rope_parameters': _rope_parameters(m), 'attention_dropout': 0.0,
      'dtype': 'float32', **ids}
  if arch == 'llama':
    out.update(attention_bias=bool(m.use_bias), mlp_bias=bool(m.use_bias))
  if arch == 'mistral':
    out['sliding_window'] = int(m.sliding_window)
  if arch == 'qwen2':
    out.update(use_sliding_window=True, sliding_window=int(m.sliding_window),
               max_window_layers=0, layer_types=[
                   'sliding_attention' if w else 'full_attention' for w in layer_windows(m)])
  return out


# --------------------------------------------------------------------------- tensors


def _layer(params: dict[str, np.ndarray], name: str, i: int, scanned: bool) -> np.ndarray:
  return params[f'blocks/{name}'][i] if scanned else params[f'blocks/{i}/{name}']


def hf_tensors(params: dict[str, np.ndarray], m: ml_collections.ConfigDict
               ) -> dict[str, np.ndarray]:
  """Our ``{param path: array}`` (scanned or not) -> HF tensor names, float32."""
  arch = architecture(m)
  dims = resolved_dims(m)
  d, n, k, h, v = m.d_model, m.num_heads, dims['num_kv_heads'], dims['head_dim'], m.vocab_size
  scanned = 'blocks/attn/query/kernel' in params
  f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
  out: dict[str, np.ndarray] = {}
  has_bias = any(p.endswith('/bias') and '/attn/' in p for p in params)
  zeros = lambda shape: np.zeros(shape, np.float32)
  for i in range(m.num_layers):
    g = lambda name, i=i: np.asarray(_layer(params, name, i, scanned), np.float32)
    gb = lambda name, shape, i=i: g(name).reshape(shape) if has_bias else zeros(shape)
    if arch == 'gpt2':
      p = f'transformer.h.{i}.'
      qkv = [g(f'attn/{x}/kernel').reshape(d, d) for x in ('query', 'key', 'value')]
      qkv_b = [gb(f'attn/{x}/bias', (d,)) for x in ('query', 'key', 'value')]
      out.update({
          p + 'ln_1.weight': g('attn_norm/scale'), p + 'ln_1.bias': g('attn_norm/bias'),
          p + 'attn.c_attn.weight': np.concatenate(qkv, axis=1),
          p + 'attn.c_attn.bias': np.concatenate(qkv_b),
          p + 'attn.c_proj.weight': g('attn/out/kernel').reshape(d, d),
          p + 'attn.c_proj.bias': gb('attn/out/bias', (d,)),
          p + 'ln_2.weight': g('mlp_norm/scale'), p + 'ln_2.bias': g('mlp_norm/bias'),
          p + 'mlp.c_fc.weight': g('mlp/wi/kernel'),
          p + 'mlp.c_fc.bias': gb('mlp/wi/bias', (dims['mlp_dim'],)),
          p + 'mlp.c_proj.weight': g('mlp/wo/kernel'),
          p + 'mlp.c_proj.bias': gb('mlp/wo/bias', (d,)),
      })
      continue
    p = f'model.layers.{i}.'
    out.update({
        p + 'input_layernorm.weight': g('attn_norm/scale'),
        p + 'self_attn.q_proj.weight': g('attn/query/kernel').reshape(d, n * h).T,
        p + 'self_attn.k_proj.weight': g('attn/key/kernel').reshape(d, k * h).T,
        p + 'self_attn.v_proj.weight': g('attn/value/kernel').reshape(d, k * h).T,
        p + 'self_attn.o_proj.weight': g('attn/out/kernel').reshape(n * h, d).T,
        p + 'post_attention_layernorm.weight': g('mlp_norm/scale'),
        p + 'mlp.gate_proj.weight': g('mlp/wi_0/kernel').T,
        p + 'mlp.up_proj.weight': g('mlp/wi_1/kernel').T,
        p + 'mlp.down_proj.weight': g('mlp/wo/kernel').T,
    })
    if arch == 'qwen2':  # Qwen2 always has q/k/v biases: ours are zero.
      out.update({p + 'self_attn.q_proj.bias': zeros((n * h,)),
                  p + 'self_attn.k_proj.bias': zeros((k * h,)),
                  p + 'self_attn.v_proj.bias': zeros((k * h,))})
    if arch == 'llama' and m.use_bias:
      out.update({
          p + 'self_attn.q_proj.bias': g('attn/query/bias').reshape(n * h),
          p + 'self_attn.k_proj.bias': g('attn/key/bias').reshape(k * h),
          p + 'self_attn.v_proj.bias': g('attn/value/bias').reshape(k * h),
          p + 'self_attn.o_proj.bias': g('attn/out/bias'),
          p + 'mlp.gate_proj.bias': g('mlp/wi_0/bias'),
          p + 'mlp.up_proj.bias': g('mlp/wi_1/bias'),
          p + 'mlp.down_proj.bias': g('mlp/wo/bias'),
      })
  embed = np.asarray(params['embed/embedding'], np.float32)[:v]  # Drop the vocab padding.
  if arch == 'gpt2':
    out.update({'transformer.wte.weight': embed,
                'transformer.wpe.weight': np.asarray(params['pos_embed/embedding'],
                                                     np.float32),
                'transformer.ln_f.weight': params['final_norm/scale'],
                'transformer.ln_f.bias': params['final_norm/bias']})
  else:
    out.update({'model.embed_tokens.weight': embed,
                'model.norm.weight': params['final_norm/scale']})
    if not m.tie_embeddings:
      out['lm_head.weight'] = np.asarray(params['unembed/kernel'], np.float32)[:, :v].T
  return {name: f32(a) for name, a in out.items()}


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map (tokenizers' ByteLevel)."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


BYTE_SPECIAL_TOKENS = ('<pad>', '<s>', '</s>')  # Our ids 0, 1, 2.


def byte_tokenizer_json(offset: int = 3):
  """A ``tokenizers.Tokenizer`` whose ids equal ByteTokenizer's (byte b -> b + offset)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  vocab = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
  vocab.update({ch: b + offset for b, ch in _bytes_to_unicode().items()})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in BYTE_SPECIAL_TOKENS])
  return tok


def write_byte_tokenizer(out: str, max_len: int) -> None:
  byte_tokenizer_json().save(os.path.join(out, 'tokenizer.json'))
  pad, bos, eos = BYTE_SPECIAL_TOKENS
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'pad_token': pad,
               'bos_token': bos, 'eos_token': eos, 'add_bos_token': False,
               'add_eos_token': False, 'model_max_length': int(max_len),
               'clean_up_tokenization_spaces': False,
               # Text that happens to contain '<s>' stays bytes, as in our tokenizer.
               'split_special_tokens': True}, f, indent=2)


# --------------------------------------------------------------------------- writing


def model_params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def check_out_dir(out: str, *sources: str) -> None:
  """Refuses an ``out`` that exists and is not empty, or is (inside) a source."""
  real = os.path.realpath(os.path.expanduser(out))
  for src in sources:
    src_real = os.path.realpath(os.path.expanduser(src))
    if real == src_real or real.startswith(src_real + os.sep):
      raise HFExportError(f'--out={out} is inside the source run {src}; the source is '
                          f'never written to: choose another directory.')
  if os.path.exists(real) and (not os.path.isdir(real) or os.listdir(real)):
    raise HFExportError(f'--out={out} exists and is not empty; choose a new directory.')


def write_hf_dir(out: str, model_cfg: ml_collections.ConfigDict,
                 params: dict[str, np.ndarray], tokenizer: str | None) -> dict[str, Any]:
  """Writes the HF directory (atomically: a sibling temp dir renamed into place).

  ``tokenizer``: 'bytes' writes tokenizer files; anything else writes none.
  """
  from safetensors.numpy import save_file
  from research.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
  check_out_dir(out)
  ids = dict(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
  config = hf_config(model_cfg, **ids)
  tensors = hf_tensors(params, model_cfg)
  out = os.path.realpath(os.path.expanduser(out))
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(out) + '.tmp-', dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, 'generation_config.json'), 'w') as f:
      json.dump({'bos_token_id': BOS_ID, 'eos_token_id': EOS_ID, 'pad_token_id': PAD_ID,
                 'do_sample': False}, f, indent=2)
    if tokenizer == 'bytes':
      write_byte_tokenizer(tmp, model_cfg.max_seq_len)
      tok_note = 'tokenizer.json: byte-level, ids equal to ours'
    else:
      tok_note = (f'no tokenizer files: data.tokenizer={tokenizer!r} does not map; encode '
                  f'with our tokenizer')
      logging.warning('HF export: %s', tok_note)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from others.
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.isdir(out):
      os.rmdir(out)  # Checked empty above.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'architecture': config['architectures'][0], 'tensors': len(tensors),
          'parameters': int(sum(a.size for a in tensors.values())), 'tokenizer': tok_note}


def _load_run(workdir: str, step: int):
  """(model, config, step) with the loader that exists (runs, then recipe, then the
  fine-tuning export's, as the trainer refactor moves it)."""
  try:
    from research.runs import load_model as load  # type: ignore[attr-defined]
  except ImportError:
    try:
      from research.recipe import load_run_model as load
    except ImportError:
      from research.finetune.export import load_run_model as load
  return load(workdir, step)


def export_run(workdir: str, out: str, step: int = -1) -> dict[str, Any]:
  """Exports the LM of run ``workdir`` (checkpoint ``step``, -1 = latest) to ``out``."""
  from research.models import lora
  from research.models.transformer import Transformer
  workdir = os.path.expanduser(workdir)
  check_out_dir(out, workdir)
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise HFExportError(f'--workdir={workdir} has no config.json: not a run of ours.')
  model, config, step = _load_run(workdir, step)
  if config.quant.mode not in ('none', 'ptq'):
    raise HFExportError(f'quant.mode={config.quant.mode!r}: the fake-quantized numerics '
                        f'have no Hugging Face form; export the float run instead.')
  if config.prune.method != 'none':
    raise HFExportError(f'prune.method={config.prune.method!r}: the masks are not in the '
                        f'weights; export the output of research.compress.export instead.')
  if lora.lora_modules(model):
    lora.merge_lora(model)
  if not isinstance(model, Transformer):
    raise HFExportError(f'task={config.task!r} is not a language model (its model is a '
                        f'{type(model).__name__}); only LM runs export.')
  architecture(config.model)  # Refuse before writing anything.
  summary = write_hf_dir(out, config.model, model_params(model), config.data.tokenizer)
  summary.update(exported_from=os.path.abspath(workdir), step=int(step),
                 out=os.path.abspath(out))
  logging.info('exported %s step %d to %s (%s)', workdir, step, out,
               summary['architecture'])
  return summary
