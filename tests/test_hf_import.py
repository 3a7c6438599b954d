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
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.2,
      rope_theta=500.0, **kw)
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


def _compare(hf_model, path, scan):
  import jax.numpy as jnp
  from research.models import hf_import
  tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 23))
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
    hf_import.model_config({**hf, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}})
  assert hf_import.is_hf_checkpoint(path)
  assert not hf_import.is_hf_checkpoint(str(tmp_path))


def test_finetune_classifier_from_hf_llama(tmp_path):
  """An HF directory as finetune.init_from: architecture from config.json, backbone
  loaded, lm_head ignored, a new head created and trained (linear probe)."""
  from research.train import train
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
