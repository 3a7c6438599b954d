"""Hugging Face import: tiny random Llama / GPT-2 saved as safetensors give our model the
same logits (within 1e-4), and an HF directory is a fine-tuning source."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 300  # >= the byte tokenizer's 259, so the fine-tuning test can use bytes.


def _llama(path, tie=False, **kw):
  kw = {'max_position_embeddings': 128, 'rope_theta': 500.0, **kw}
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, initializer_range=0.2, **kw)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def _gpt2(path):
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2,
                                n_head=4, initializer_range=0.2, layer_norm_epsilon=1e-5)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # Non-zero biases and norms, so their mapping is exercised.
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def _compare(hf_model, path, scan, length=23):
  import jax.numpy as jnp
  from research.models import hf_import
  tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, length))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.float().numpy()
  from flax import nnx
  model, cfg = hf_import.load_model(path, scan_layers=scan)
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32)))
  assert ours.shape == ref.shape
  assert np.abs(ref).max() > 0.5  # Logits of a useful size, not all ~0.
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  return cfg


@pytest.mark.parametrize('scan', [True, False])
def test_llama_logits_match(tmp_path, scan):
  path = str(tmp_path / 'llama')
  hf = _llama(path)
  assert os.path.exists(os.path.join(path, 'model.safetensors'))
  cfg = _compare(hf, path, scan)
  assert (cfg.num_kv_heads, cfg.mlp_kind, cfg.positions, cfg.tie_embeddings) == (
      2, 'swiglu', 'rope', False)
  assert cfg.rope_theta == 500.0


def test_llama_tied_embeddings(tmp_path):
  path = str(tmp_path / 'llama_tied')
  _compare(_llama(path, tie=True), path, True)


@pytest.mark.parametrize('scan', [True, False])
def test_gpt2_logits_match(tmp_path, scan):
  path = str(tmp_path / 'gpt2')
  cfg = _compare(_gpt2(path), path, scan)
  assert (cfg.mlp_kind, cfg.norm, cfg.positions, cfg.use_bias) == (
      'gelu', 'layernorm', 'learned', True)


def test_unsupported_checkpoints_are_clear_errors(tmp_path):
  from research.models import hf_import
  path = str(tmp_path / 'llama')
  _llama(path)
  hf = json.load(open(os.path.join(path, 'config.json')))
  with pytest.raises(hf_import.HFImportError, match='model_type'):
    hf_import.model_config({**hf, 'model_type': 'bert'})
  with pytest.raises(hf_import.HFImportError, match='rope_type'):
    hf_import.model_config({**hf, 'rope_parameters': {'rope_type': 'dynamic', 'factor': 4.0}})
  with pytest.raises(hf_import.HFImportError, match='soft-capping'):
    hf_import.model_config({**hf, 'model_type': 'gemma2'})
  with pytest.raises(hf_import.HFImportError, match='partial_rotary_factor'):
    hf_import.model_config({**hf, 'partial_rotary_factor': 0.5})
  with pytest.raises(hf_import.HFImportError, match='layer_types'):
    hf_import.model_config({**hf, 'model_type': 'qwen2', 'use_sliding_window': True,
                            'sliding_window': 4,
                            'layer_types': ['chunked_attention', 'full_attention']})
  assert hf_import.is_hf_checkpoint(path)
  assert not hf_import.is_hf_checkpoint(str(tmp_path))


def test_pytorch_bin_only_directory_is_told_to_convert(tmp_path):
  from research.models import hf_import
  path = str(tmp_path / 'llama_bin')
  _llama(path)
  os.remove(os.path.join(path, 'model.safetensors'))
  open(os.path.join(path, 'pytorch_model.bin'), 'wb').close()
  assert hf_import.is_hf_checkpoint(path)  # An HF source (read-only), not "no config.json".
  for call in (hf_import.model_config, hf_import.load_params):
    with pytest.raises(hf_import.HFImportError) as e:
      call(path)
    msg = str(e.value)
    assert 'pytorch_model.bin but no model.safetensors' in msg and '\n' not in msg
    assert 'save_pretrained' in msg and 'safe_serialization=True' in msg


def test_finetune_classifier_from_hf_llama(tmp_path):
  """An HF directory as finetune.init_from: architecture from config.json, backbone
  loaded, lm_head ignored, a new head created and trained (linear probe)."""
  from research.recipe import run as train
  from tests.helpers import smoke_config
  path = str(tmp_path / 'llama')
  _llama(path)
  wd = str(tmp_path / 'ft')
  c = smoke_config(**{'task': 'classification', 'finetune.init_from': path,
                      'finetune.mode': 'linear_probe', 'steps': 2,
                      'eval_every': 2, 'eval_steps': 1, 'checkpoint_every': 2,
                      'data.eval_fraction': 0.2, 'finetune.max_train_per_class': 20,
                      'finetune.max_eval_per_class': 4, 'num_samples': 0})
  train(c, wd)
  report = json.load(open(os.path.join(wd, 'init_report.json')))
  assert report['kind'] == 'hf'
  assert 'unembed/kernel' in report['ignored']
  assert 'blocks/attn/query/kernel' in report['loaded']
  assert {'head/kernel', 'head/bias'} <= set(report['created'])
  assert report['trainable_params'] == 64 * 12 + 12 and report['lora_params'] == 0
  saved = json.load(open(os.path.join(wd, 'config.json')))['config']['model']
  assert (saved['d_model'], saved['num_kv_heads'], saved['vocab_size']) == (64, 2, VOCAB)


def test_hf_tokenizer_json_is_used_for_an_hf_source(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  from research.config import base_config
  from research.data.tokenizers import ByteTokenizer
  from research.finetune import init as ft_init
  from research.models import hf_import
  path = str(tmp_path / 'llama')
  _llama(path)
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['def f(x):\n    return x + 1\n'] * 20, trainers.BpeTrainer(
      vocab_size=280, special_tokens=['<unk>', '<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(path, 'tokenizer.json'))
  c = base_config()
  c.finetune.init_from = path
  got = ft_init.source_tokenizer(c, ByteTokenizer())
  assert isinstance(got, hf_import.HFTokenizer)
  ids = got.encode('def f(x):\n    return x + 1\n')
  assert got.decode(ids) == 'def f(x):\n    return x + 1\n' and len(ids) < 20
  assert (got.bos_id, got.eos_id, got.pad_id) == (1, 2, 2) and got.vocab_size <= VOCAB


# --------------------------------------------------------------------------- RoPE scaling,
# sliding windows (Llama 3.x, Mistral, Qwen2) and greedy generation


ROPE_CASES = {
    'linear': {'rope_type': 'linear', 'factor': 4.0},
    'llama3': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16},
    'yarn': {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16,
             'beta_fast': 8.0, 'beta_slow': 1.0},
}


@pytest.mark.parametrize('name', sorted(ROPE_CASES))
def test_rope_frequencies_equal_transformers(name):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from research.models import hf_import
  from research.models.attention import RopeScaling, rope_frequencies
  cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2,
                                 max_position_embeddings=64, rope_theta=500000.0,
                                 rope_parameters={**ROPE_CASES[name], 'rope_theta': 500000.0})
  want, want_scale = ROPE_INIT_FUNCTIONS[name](cfg, 'cpu')
  ours = hf_import.model_config({**cfg.to_dict(), 'model_type': 'llama'})
  scaling = RopeScaling(**{k: ours[f'rope_{k}'] for k in (
      'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_len', 'beta_fast',
      'beta_slow', 'attention_factor', 'truncate') if f'rope_{k}' in ours},
                        kind=ours['rope_scaling'])
  got, scale = rope_frequencies(128, ours['rope_theta'], scaling)
  np.testing.assert_allclose(got, want.numpy(), rtol=2e-7, atol=0)
  assert scale == pytest.approx(want_scale, rel=1e-7)
  assert ours['rope_scaling'] == name


@pytest.mark.parametrize('name', sorted(ROPE_CASES))
def test_scaled_rope_llama_logits_match_beyond_the_original_context(tmp_path, name):
  """48 tokens: three times the original context (16) of the scaled RoPE."""
  path = str(tmp_path / name)
  hf = _llama(path, rope_parameters={**ROPE_CASES[name], 'rope_theta': 500.0},
              max_position_embeddings=64)
  cfg = _compare(hf, path, True, length=48)
  assert cfg.rope_scaling == name


def _mistral(path, window, max_pos=64):
  cfg = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
      rms_norm_eps=1e-5, initializer_range=0.2, sliding_window=window, rope_theta=500.0)
  torch.manual_seed(0)
  model = transformers.MistralForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def _qwen2(path, **kw):
  cfg = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, initializer_range=0.2, rope_theta=500.0, **kw)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():  # Non-zero q/k/v biases.
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize('scan', [True, False])
def test_mistral_sliding_window_logits_match_beyond_the_window(tmp_path, scan):
  path = str(tmp_path / 'mistral')
  cfg = _compare(_mistral(path, window=8), path, scan, length=40)
  assert (cfg.sliding_window, cfg.window_layers) == (8, '')


def test_mistral_window_at_max_positions_is_full_attention(tmp_path):
  path = str(tmp_path / 'mistral_full')
  cfg = _compare(_mistral(path, window=64), path, True, length=40)
  assert cfg.sliding_window == 0


@pytest.mark.parametrize('scan,kw,pattern', [
    (True, dict(max_window_layers=2), 'GGLL'),
    (False, dict(max_window_layers=2), 'GGLL'),
    (True, dict(layer_types=['sliding_attention', 'full_attention'] * 2), 'LGLG'),
])
def test_qwen2_per_layer_windows_logits_match(tmp_path, scan, kw, pattern):
  """Was silently wrong after the window (max diff 3.0) before per-layer windows."""
  path = str(tmp_path / 'qwen2')
  hf = _qwen2(path, use_sliding_window=True, sliding_window=8, **kw)
  cfg = _compare(hf, path, scan, length=40)
  assert (cfg.sliding_window, cfg.window_layers) == (8, pattern)


def test_qwen2_without_use_sliding_window_is_full_attention(tmp_path):
  path = str(tmp_path / 'qwen2_full')
  cfg = _compare(_qwen2(path, use_sliding_window=False, sliding_window=8), path, True,
                 length=40)
  assert cfg.sliding_window == 0


@pytest.mark.parametrize('family', ['mistral', 'llama3'])
def test_greedy_generation_equals_transformers_generate(tmp_path, family):
  """Our KV-cache decode (windowed / scaled RoPE) continues as generate(do_sample=False)."""
  from research.decode import generate
  from research.models import hf_import
  path = str(tmp_path / family)
  if family == 'mistral':
    hf = _mistral(path, window=8)
  else:
    hf = _llama(path, rope_parameters={**ROPE_CASES['llama3'], 'rope_theta': 500.0},
                max_position_embeddings=64)
  prompt = np.random.RandomState(1).randint(0, VOCAB, size=(2, 6))
  hf.generation_config.eos_token_id = None  # Ours runs all 30 steps (no EOS stop).
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompt), max_new_tokens=30, do_sample=False,
                       pad_token_id=0).numpy()
  model, _ = hf_import.load_model(path)
  got = generate(model, prompt, max_new_tokens=30)
  np.testing.assert_array_equal(got, want)
