"""Export to Hugging Face: ours -> HF directory -> transformers gives our logits (1e-5),
the byte tokenizer round-trips, unmappable runs and unsafe output paths are refused."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from research.config import base_config  # noqa: E402
from research.models import hf_export  # noqa: E402
from research.models.transformer import Transformer  # noqa: E402

VOCAB = 259  # The byte tokenizer's.


def _model(**overrides):
  c = base_config().model
  # init_std 1/sqrt(d_model): unit-gain layers, logits of a few units.
  c.update(vocab_size=VOCAB, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2,
           mlp_dim=96, max_seq_len=64, init_std=0.125, tie_embeddings=False)
  for k, v in overrides.items():
    c[k] = v
  model = Transformer(c, rngs=nnx.Rngs(0))
  # Non-trivial norms and biases, so their mapping is exercised.
  state = nnx.state(model, nnx.Param)
  flat = []
  for i, (p, v) in enumerate(nnx.to_flat_state(state)):
    name = '/'.join(map(str, p))
    if name.endswith(('scale', 'bias')):
      noise = 0.1 * jax.random.normal(jax.random.key(i), v.shape)
      flat.append((p, v.replace(v[...] + noise)))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, c


def _round_trip(tmp_path, length=40, **overrides):
  model, cfg = _model(**overrides)
  out = str(tmp_path / 'hf')
  summary = hf_export.write_hf_dir(out, cfg, hf_export.model_params(model), 'bytes')
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, length))
  ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  assert np.abs(ref).max() > 1.0  # Logits of a useful size.
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  return summary, json.load(open(os.path.join(out, 'config.json'))), hf, model


@pytest.mark.parametrize('overrides,cls', [
    (dict(), 'LlamaForCausalLM'),
    (dict(use_bias=True, scan_layers=False, tie_embeddings=True, rope_scaling='llama3',
          rope_factor=8.0, rope_original_max_len=16), 'LlamaForCausalLM'),
    (dict(rope_scaling='yarn', rope_factor=4.0, rope_original_max_len=16, rope_beta_fast=8.0),
     'LlamaForCausalLM'),
    (dict(sliding_window=8), 'MistralForCausalLM'),
    (dict(sliding_window=8, window_layers='LGL'), 'Qwen2ForCausalLM'),
    (dict(positions='learned', norm='layernorm', mlp_kind='gelu', use_bias=True,
          num_kv_heads=0, tie_embeddings=True, norm_eps=1e-5), 'GPT2LMHeadModel'),
])
def test_round_trip_logits_equal_ours(tmp_path, overrides, cls):
  summary, config, hf, _ = _round_trip(tmp_path, **overrides)
  assert summary['architecture'] == cls == config['architectures'][0]
  assert type(hf).__name__ == cls  # A stock transformers class: no custom code.
  out = tmp_path / 'hf'
  assert {p.name for p in out.iterdir()} == {
      'config.json', 'model.safetensors', 'generation_config.json', 'tokenizer.json',
      'tokenizer_config.json'}


def test_gpt2_without_biases_exports_zero_biases(tmp_path):
  _round_trip(tmp_path, positions='learned', norm='layernorm', mlp_kind='gelu',
              num_kv_heads=0, tie_embeddings=True)


def test_exported_windowed_model_generates_as_ours(tmp_path):
  from research.decode import generate
  _, _, hf, model = _round_trip(tmp_path, sliding_window=6, window_layers='GL', length=8)
  prompt = np.random.RandomState(2).randint(3, VOCAB, size=(2, 5))
  hf.generation_config.eos_token_id = None  # Ours runs all 20 steps (no EOS stop).
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False).numpy()
  np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=20), want)


def test_byte_tokenizer_round_trips_through_transformers(tmp_path):
  from research.data.tokenizers import ByteTokenizer
  model, cfg = _model(num_layers=1)
  out = str(tmp_path / 'hf')
  hf_export.write_hf_dir(out, cfg, hf_export.model_params(model), 'bytes')
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = ByteTokenizer()
  texts = ['def f(x):\n    return x + 1\n', '  leading spaces\tand tabs\r\n',
           'héllo 中文 😀', 'literal <s> and </s> and <pad> stay bytes', '', ' ']
  for text in texts:
    ids = tok(text).input_ids
    assert ids == ours.encode(text).tolist(), text
    assert tok.decode(ids) == text
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
      ours.pad_id, ours.bos_id, ours.eos_id)
  assert tok.decode([ours.bos_id, *ours.encode('ab').tolist(), ours.eos_id],
                    skip_special_tokens=True) == 'ab'
  gen = json.load(open(os.path.join(out, 'generation_config.json')))
  assert gen['eos_token_id'] == ours.eos_id


@pytest.mark.parametrize('overrides,match', [
    (dict(causal=False), 'bidirectional'),
    (dict(positions='learned'), 'maps to no Hugging Face class'),
    (dict(sliding_window=8, use_bias=True), 'use_bias'),
    (dict(positions='learned', norm='layernorm', mlp_kind='gelu', num_kv_heads=0),
     'ties its output head'),
])
def test_unmappable_architectures_are_refused_in_one_line(tmp_path, overrides, match):
  _, cfg = _model(num_layers=1, **overrides)
  with pytest.raises(hf_export.HFExportError, match=match) as e:
    hf_export.write_hf_dir(str(tmp_path / 'hf'), cfg, {}, 'bytes')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'hf').exists()


def test_out_directory_rules(tmp_path):
  src = tmp_path / 'run'
  src.mkdir()
  (src / 'config.json').write_text('{}')
  with pytest.raises(hf_export.HFExportError, match='inside the source run'):
    hf_export.check_out_dir(str(src), str(src))
  with pytest.raises(hf_export.HFExportError, match='inside the source run'):
    hf_export.check_out_dir(str(src / 'hf'), str(src))
  with pytest.raises(hf_export.HFExportError, match='exists and is not empty'):
    hf_export.check_out_dir(str(src), str(tmp_path / 'other'))
  (tmp_path / 'empty').mkdir()
  hf_export.check_out_dir(str(tmp_path / 'empty'), str(src))  # An empty dir is fine.


def test_export_run_merges_lora_refuses_non_lm_and_never_writes_the_source(
    tmp_path, monkeypatch):
  """export_run around the run loader (the loader itself is the trainer's, tested there):
  LoRA adapters merged before writing, a classifier refused, a sentencepiece run
  exported without tokenizer files."""
  from research.models import lora
  model, mcfg = _model(num_layers=1)
  config = base_config()
  config.model = mcfg
  config.data.tokenizer = 'sentencepiece'
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  before = sorted(p.name for p in run.iterdir())
  monkeypatch.setattr(hf_export, '_load_run', lambda w, s: (model, config, 7))
  merged = {'n': 0}
  monkeypatch.setattr(lora, 'lora_modules', lambda m: [('x', None)])
  monkeypatch.setattr(lora, 'merge_lora', lambda m: merged.update(n=merged['n'] + 1) or m)
  summary = hf_export.export_run(str(run), str(tmp_path / 'hf'))
  assert merged['n'] == 1 and summary['step'] == 7
  assert 'no tokenizer files' in summary['tokenizer']
  assert not (tmp_path / 'hf' / 'tokenizer.json').exists()
  assert sorted(p.name for p in run.iterdir()) == before
  config.task = 'classification'
  monkeypatch.setattr(hf_export, '_load_run', lambda w, s: (object(), config, 7))
  with pytest.raises(hf_export.HFExportError, match='not a language model'):
    hf_export.export_run(str(run), str(tmp_path / 'hf2'))


def test_cli_refuses_an_existing_output_in_one_line(tmp_path):
  from tests.helpers import run_cli
  out = tmp_path / 'full'
  out.mkdir()
  (out / 'x').write_text('keep')
  r = run_cli(['launch.export_hf', f'--workdir={tmp_path / "run"}', f'--out={out}'],
              timeout=120)
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and 'exists and is not empty' in last
  assert (out / 'x').read_text() == 'keep'
