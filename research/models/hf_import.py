"""Import Hugging Face checkpoints (safetensors) into our Transformer.

Supported ``model_type``s (config mapping in :func:`model_config`, weights in
:func:`load_params`):

* Llama family: ``llama`` (Llama 2/3.x), ``mistral``, ``qwen2`` (q/k/v biases; our
  ``use_bias`` then also holds zero out/MLP biases). RMSNorm, RoPE in the rotate-half
  convention (our ``apply_rope``) with ``rope_type`` default, ``linear``, ``llama3`` or
  ``yarn`` (``model.rope_scaling``), GQA, SwiGLU (``gate_proj``->``wi_0``,
  ``up_proj``->``wi_1``, ``down_proj``->``wo``), tied or untied ``lm_head``. Sliding
  windows: Mistral's ``sliding_window`` (at or above ``max_position_embeddings`` it is
  full attention), Qwen2's ``use_sliding_window``/``max_window_layers``/``layer_types``
  (``model.sliding_window`` + the per-layer ``model.window_layers`` pattern).
* ``gpt2``: learned positions, LayerNorm, biases everywhere, ``gelu_new`` (the tanh
  approximation, which is what our ``mlp_kind='gelu'`` computes), Conv1D weights
  (stored ``[in, out]``), fused ``c_attn`` split into query/key/value, tied head.

Refused in one line (:class:`HFImportError`): other model types (Gemma-2 among them:
its sandwich norms, soft-capping and scaled embeddings are not our block), other RoPE
types (``dynamic``, ``longrope``), partial rotary embeddings, other activations.

Only the files are read (``config.json``, ``model.safetensors`` or a sharded
``model.safetensors.index.json``): torch and transformers are not needed. The
vocabulary is padded with zero rows to our multiple of 128 (the model slices logits
back to ``vocab_size``). ``tokenizer.json`` is wrapped by :class:`HFTokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

from research.config import ConfigError
from research.models.transformer import padded_vocab_size

LLAMA_TYPES = ('llama', 'mistral', 'qwen2')
GPT2_TYPES = ('gpt2',)
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


class HFImportError(ConfigError):
  """The Hugging Face checkpoint cannot be mapped onto our model; says why."""


def _read_config(path: str) -> dict[str, Any]:
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f)


SAFETENSORS = ('model.safetensors', 'model.safetensors.index.json')
TORCH_WEIGHTS = ('pytorch_model.bin', 'pytorch_model.bin.index.json')


def is_hf_checkpoint(path: str) -> bool:
  """A directory with an HF ``config.json`` (one with ``model_type``).

  Whatever its weights: such a directory is a read-only source, and one without
  safetensors gets :func:`check_weights`'s message, not "not a run of ours".
  """
  path = os.path.expanduser(path)
  if not os.path.isdir(path) or not os.path.exists(os.path.join(path, 'config.json')):
    return False
  try:
    cfg = _read_config(path)
  except (OSError, ValueError):
    return False
  return isinstance(cfg, dict) and 'model_type' in cfg


def check_weights(path: str) -> None:
  """Raises :class:`HFImportError` unless ``path`` has safetensors weights, saying how
  to convert PyTorch ``.bin`` weights."""
  if any(os.path.exists(os.path.join(path, f)) for f in SAFETENSORS):
    return
  found = [f for f in TORCH_WEIGHTS if os.path.exists(os.path.join(path, f))]
  if found:
    raise HFImportError(
        f'{path} has config.json and {found[0]} but no model.safetensors: weights are read '
        f'only from safetensors; convert once with python -c "import transformers as t; '
        f"t.AutoModelForCausalLM.from_pretrained('{path}').save_pretrained('OUT_DIR', "
        f'safe_serialization=True)" and copy the tokenizer files.')
  raise HFImportError(f'{path} has config.json but no model.safetensors (or '
                      f'model.safetensors.index.json) weights.')


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
  """Our ``model.rope_*`` keys from ``rope_parameters`` (transformers 5) or the older
  ``rope_scaling`` + ``rope_theta``, as transformers' ``ROPE_INIT_FUNCTIONS`` read them."""
  params = dict(hf.get('rope_scaling') or {})
  params.update(hf.get('rope_parameters') or {})
  rope_type = params.get('rope_type') or params.get('type') or 'default'
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  if float(params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))) != 1.0:
    raise HFImportError('partial_rotary_factor != 1 (rotary on part of the head) is not '
                        'supported; our RoPE rotates the whole head.')
  out: dict[str, Any] = {'rope_theta': theta, 'rope_scaling': 'none'}
  if rope_type == 'default':
    return out
  if rope_type not in ('linear', 'llama3', 'yarn'):
    raise HFImportError(f'rope_type={rope_type!r} is not supported; supported: default, '
                        f'linear, llama3, yarn.')
  original = params.get('original_max_position_embeddings')
  factor = params.get('factor')
  if rope_type == 'yarn' and factor is None and original:
    factor = hf['max_position_embeddings'] / original
  out.update(rope_scaling=rope_type, rope_factor=float(factor))
  if rope_type == 'llama3':
    out.update(rope_low_freq_factor=float(params['low_freq_factor']),
               rope_high_freq_factor=float(params['high_freq_factor']),
               rope_original_max_len=int(original))
  if rope_type == 'yarn':
    attention = params.get('attention_factor')
    mscale, mscale_all = params.get('mscale'), params.get('mscale_all_dim')
    if attention is None and mscale and mscale_all:
      m = lambda s: 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0
      attention = m(mscale) / m(mscale_all)
    out.update(rope_original_max_len=int(original or hf['max_position_embeddings']),
               rope_beta_fast=float(params.get('beta_fast') or 32.0),
               rope_beta_slow=float(params.get('beta_slow') or 1.0),
               rope_attention_factor=float(attention or 0.0),
               rope_truncate=bool(params.get('truncate', True)))
  return out


def _windows(hf: dict[str, Any]) -> dict[str, Any]:
  """``sliding_window`` and the ``window_layers`` pattern, as transformers applies them.

  Mistral: one window for every layer. Qwen2: a window only with
  ``use_sliding_window``, on the layers whose ``layer_types`` entry is
  ``sliding_attention`` (by default those with index >= ``max_window_layers``). A window
  at or above ``max_position_embeddings`` never masks anything: full attention.
  """
  mtype, layers = hf['model_type'], int(hf['num_hidden_layers'])
  window = hf.get('sliding_window')
  if mtype == 'qwen2':
    window = window if hf.get('use_sliding_window', False) else None
    types = hf.get('layer_types') or [
        'sliding_attention' if window is not None and i >= hf.get('max_window_layers', 28)
        else 'full_attention' for i in range(layers)]
  else:
    types = ['sliding_attention'] * layers
  unknown = sorted(set(types) - {'sliding_attention', 'full_attention'})
  if unknown:
    raise HFImportError(f'layer_types {unknown} are not supported (only sliding_attention '
                        f'and full_attention).')
  if len(types) != layers:
    raise HFImportError(f'layer_types has {len(types)} entries for {layers} layers.')
  if not window or window >= int(hf.get('max_position_embeddings', 2048)) \
      or 'sliding_attention' not in types:
    return {'sliding_window': 0, 'window_layers': ''}
  pattern = ''.join('L' if t == 'sliding_attention' else 'G' for t in types)
  return {'sliding_window': int(window), 'window_layers': '' if set(pattern) == {'L'}
          else pattern}


def model_config(path_or_config: str | dict[str, Any]) -> dict[str, Any]:
  """Our ``model.*`` keys for an HF checkpoint (a directory or its parsed config.json)."""
  if isinstance(path_or_config, str):
    hf = _read_config(path_or_config)
    check_weights(path_or_config)
  else:
    hf = path_or_config
  mtype = hf.get('model_type')
  if mtype in LLAMA_TYPES:
    if hf.get('hidden_act', 'silu') != 'silu':
      raise HFImportError(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) maps "
                          f"onto model.mlp_kind=swiglu.")
    heads = int(hf['num_attention_heads'])
    d = int(hf['hidden_size'])
    use_bias = bool(hf.get('attention_bias') or hf.get('mlp_bias') or mtype == 'qwen2')
    return {
        'vocab_size': int(hf['vocab_size']), 'd_model': d,
        'num_layers': int(hf['num_hidden_layers']), 'num_heads': heads,
        'num_kv_heads': int(hf.get('num_key_value_heads') or heads),
        'head_dim': int(hf.get('head_dim') or d // heads), 'mlp_kind': 'swiglu',
        'mlp_dim': int(hf['intermediate_size']), 'norm': 'rmsnorm',
        'norm_eps': float(hf.get('rms_norm_eps', 1e-6)), 'positions': 'rope',
        'max_seq_len': int(hf.get('max_position_embeddings', 2048)),
        'tie_embeddings': bool(hf.get('tie_word_embeddings', False)), 'use_bias': use_bias,
        **_rope_parameters(hf), **_windows(hf),
    }
  if mtype in GPT2_TYPES:
    act = hf.get('activation_function', 'gelu_new')
    if act not in _TANH_GELUS:
      raise HFImportError(f'activation_function={act!r}: our gelu MLP is the tanh '
                          f'approximation ({", ".join(_TANH_GELUS)}).')
    if hf.get('scale_attn_by_inverse_layer_idx'):
      raise HFImportError('scale_attn_by_inverse_layer_idx=True is not supported.')
    if hf.get('scale_attn_weights') is False:
      raise HFImportError('scale_attn_weights=False is not supported.')
    d = int(hf['n_embd'])
    return {
        'vocab_size': int(hf['vocab_size']), 'd_model': d, 'num_layers': int(hf['n_layer']),
        'num_heads': int(hf['n_head']), 'num_kv_heads': 0, 'head_dim': 0, 'mlp_kind': 'gelu',
        'mlp_dim': int(hf.get('n_inner') or 4 * d), 'norm': 'layernorm',
        'norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)), 'positions': 'learned',
        'rope_theta': 10000.0, 'max_seq_len': int(hf['n_positions']),
        'tie_embeddings': True, 'use_bias': True,
    }
  why = _REFUSED.get(mtype, '')
  raise HFImportError(f'model_type={mtype!r} is not supported{why}; supported: '
                      f'{", ".join(LLAMA_TYPES + GPT2_TYPES)}.')


_REFUSED = {
    'gemma2': ' (sandwich norms, attention/logit soft-capping and scaled embeddings are '
              'not our block)',
    'gemma': ' (GeGLU, (1 + scale) norms and scaled embeddings are not our block)',
    'mixtral': ' (mixture-of-experts MLPs)',
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of ``model.safetensors`` (or the shards of its index) as numpy arrays
  (bfloat16 via ml_dtypes, upcast by the caller)."""
  from safetensors import safe_open
  check_weights(path)
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = ['model.safetensors']
  out = {}
  for name in files:
    with safe_open(os.path.join(path, name), framework='flax') as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key))
  return out


def _strip(tensors: dict[str, np.ndarray], prefixes: Sequence[str]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tensors.items():
    for p in prefixes:
      if k.startswith(p):
        k = k[len(p):]
        break
    out[k] = v
  return out


def _pad_vocab(table_VD: np.ndarray, vocab: int) -> np.ndarray:
  pad = padded_vocab_size(vocab) - table_VD.shape[0]
  return np.concatenate([table_VD, np.zeros((pad,) + table_VD.shape[1:], table_VD.dtype)])


def _llama_layer(t: dict[str, np.ndarray], i: int, c: dict[str, Any]) -> dict[str, np.ndarray]:
  d, n, k, h = c['d_model'], c['num_heads'], c['num_kv_heads'], c['head_dim']
  p = f'layers.{i}.'
  g = lambda name: t[p + name]
  out = {
      'attn_norm/scale': g('input_layernorm.weight'),
      'attn/query/kernel': g('self_attn.q_proj.weight').T.reshape(d, n, h),
      'attn/key/kernel': g('self_attn.k_proj.weight').T.reshape(d, k, h),
      'attn/value/kernel': g('self_attn.v_proj.weight').T.reshape(d, k, h),
      'attn/out/kernel': g('self_attn.o_proj.weight').T.reshape(n, h, d),
      'mlp_norm/scale': g('post_attention_layernorm.weight'),
      'mlp/wi_0/kernel': g('mlp.gate_proj.weight').T,
      'mlp/wi_1/kernel': g('mlp.up_proj.weight').T,
      'mlp/wo/kernel': g('mlp.down_proj.weight').T,
  }
  if c['use_bias']:
    bias = lambda name, shape: (t[p + name].reshape(shape) if p + name in t
                                else np.zeros(shape, np.float32))
    out.update({
        'attn/query/bias': bias('self_attn.q_proj.bias', (n, h)),
        'attn/key/bias': bias('self_attn.k_proj.bias', (k, h)),
        'attn/value/bias': bias('self_attn.v_proj.bias', (k, h)),
        'attn/out/bias': bias('self_attn.o_proj.bias', (d,)),
        'mlp/wi_0/bias': bias('mlp.gate_proj.bias', (c['mlp_dim'],)),
        'mlp/wi_1/bias': bias('mlp.up_proj.bias', (c['mlp_dim'],)),
        'mlp/wo/bias': bias('mlp.down_proj.bias', (d,)),
    })
  return out


def _gpt2_layer(t: dict[str, np.ndarray], i: int, c: dict[str, Any]) -> dict[str, np.ndarray]:
  d, n = c['d_model'], c['num_heads']
  h = d // n
  p = f'h.{i}.'
  g = lambda name: t[p + name]
  wq, wk, wv = np.split(g('attn.c_attn.weight'), 3, axis=1)  # Conv1D: [in, out].
  bq, bk, bv = np.split(g('attn.c_attn.bias'), 3)
  return {
      'attn_norm/scale': g('ln_1.weight'), 'attn_norm/bias': g('ln_1.bias'),
      'attn/query/kernel': wq.reshape(d, n, h), 'attn/query/bias': bq.reshape(n, h),
      'attn/key/kernel': wk.reshape(d, n, h), 'attn/key/bias': bk.reshape(n, h),
      'attn/value/kernel': wv.reshape(d, n, h), 'attn/value/bias': bv.reshape(n, h),
      'attn/out/kernel': g('attn.c_proj.weight').reshape(n, h, d),
      'attn/out/bias': g('attn.c_proj.bias'),
      'mlp_norm/scale': g('ln_2.weight'), 'mlp_norm/bias': g('ln_2.bias'),
      'mlp/wi/kernel': g('mlp.c_fc.weight'), 'mlp/wi/bias': g('mlp.c_fc.bias'),
      'mlp/wo/kernel': g('mlp.c_proj.weight'), 'mlp/wo/bias': g('mlp.c_proj.bias'),
  }


def load_params(path: str, model_cfg: ml_collections.ConfigDict | dict[str, Any] | None = None
                ) -> dict[str, np.ndarray]:
  """``{param path: float32 array}`` in our layout (``blocks/...`` stacked on a leading
  layer axis when ``model_cfg.scan_layers``, else ``blocks/<i>/...``)."""
  hf = _read_config(path)
  c = model_config(hf)
  scan = True if model_cfg is None else bool(model_cfg['scan_layers'])
  raw = {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}
  out: dict[str, np.ndarray] = {}
  if hf['model_type'] in LLAMA_TYPES:
    lm_head = raw.get('lm_head.weight')
    t = _strip(raw, ('model.',))
    layer_fn = _llama_layer
    out['embed/embedding'] = _pad_vocab(t['embed_tokens.weight'], c['vocab_size'])
    out['final_norm/scale'] = t['norm.weight']
    if not c['tie_embeddings']:
      if lm_head is None:
        raise HFImportError(f'{path}: tie_word_embeddings=False but lm_head.weight is missing.')
      out['unembed/kernel'] = _pad_vocab(lm_head, c['vocab_size']).T
  else:
    t = _strip(raw, ('transformer.',))
    layer_fn = _gpt2_layer
    out['embed/embedding'] = _pad_vocab(t['wte.weight'], c['vocab_size'])
    out['pos_embed/embedding'] = t['wpe.weight']
    out['final_norm/scale'] = t['ln_f.weight']
    out['final_norm/bias'] = t['ln_f.bias']
  try:
    layers = [layer_fn(t, i, c) for i in range(c['num_layers'])]
  except KeyError as e:
    raise HFImportError(f'{path}: tensor {e} is missing from the safetensors files.') from None
  for name in layers[0]:
    if scan:
      out[f'blocks/{name}'] = np.stack([layer[name] for layer in layers])
    else:
      for i, layer in enumerate(layers):
        out[f'blocks/{i}/{name}'] = layer[name]
  return out


def load_model(path: str, **model_overrides: Any):
  """(Transformer with the HF weights, its model config) — for notebooks and tests."""
  from flax import nnx

  from research.config import base_config
  from research.models.transformer import Transformer
  cfg = base_config().model
  for k, v in model_config(path).items():
    cfg[k] = v
  for k, v in model_overrides.items():
    cfg[k] = v
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = load_params(path, cfg)
  state = nnx.state(model, nnx.Param)
  flat = []
  for p, var in nnx.to_flat_state(state):
    key = '/'.join(map(str, p))
    if key not in params:
      raise HFImportError(f'{path}: no tensor for our parameter {key}.')
    if tuple(params[key].shape) != tuple(var.shape):
      raise HFImportError(f'{key}: HF {params[key].shape} vs ours {var.shape}.')
    flat.append((p, var.replace(params[key].astype(var[...].dtype))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, cfg


# --------------------------------------------------------------------------- tokenizer


class HFTokenizer:
  """``tokenizer.json`` (the ``tokenizers`` library) behind our Tokenizer interface.

  ``pad_id`` is the tokenizer's pad token, else EOS (padding is always masked).
  """

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer as _Tok
    except ImportError as e:
      raise HFImportError(f'the HF tokenizer needs the `tokenizers` package ({e}).') from None
    file = os.path.join(path, 'tokenizer.json')
    if not os.path.exists(file):
      raise HFImportError(f'{path} has no tokenizer.json.')
    self._file = file
    self._tok = _Tok.from_file(file)
    hf = _read_config(path)
    self.bos_id = _first_id(hf.get('bos_token_id'))
    self.eos_id = _first_id(hf.get('eos_token_id'))
    pad = _first_id(hf.get('pad_token_id'))
    self.eos_id = self.eos_id if self.eos_id is not None else 0
    self.pad_id = pad if pad is not None else self.eos_id

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def fingerprint(self) -> str:
    with open(self._file, 'rb') as f:
      return 'hf-' + hashlib.sha1(f.read()).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(list(ids)).reshape(-1)])


def _first_id(x: Any) -> int | None:
  if isinstance(x, list):
    return int(x[0]) if x else None
  return None if x is None else int(x)
