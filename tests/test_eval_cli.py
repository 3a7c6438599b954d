"""launch.eval and launch.generate on a smoke run of ours and on a tiny HF Llama
directory: JSON output, the trainer's own eval reproduced, nothing written into the run,
HF scores equal to transformers' log-likelihoods, greedy generation equal to
transformers' generate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers import run_cli, smoke_config


def _listing(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.path.getsize(p), os.path.getmtime(p))
  return out


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  from research import recipe
  workdir = str(tmp_path_factory.mktemp('evalrun') / 'run')
  recipe.run(smoke_config(**{'keep_checkpoints': 3}), workdir)
  return workdir


def _eval_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: r for r in rows if r['split'] == 'eval'}


def test_eval_reproduces_the_trainers_eval_at_each_step(smoke_run):
  from research.eval_run import evaluate_run
  before = _listing(smoke_run)
  rows = _eval_rows(smoke_run)
  for step in (3, 6):
    got = evaluate_run(smoke_run, step)
    assert got['step'] == step and got['kind'] == 'run'
    assert got['loss'] == pytest.approx(rows[step]['loss'], rel=1e-5)
    assert got['num_tokens'] == rows[step]['num_tokens']
    assert got['perplexity'] == pytest.approx(np.exp(got['loss']))
  part = evaluate_run(smoke_run, -1, {'eval_tokens': 100})
  assert part['step'] == 6 and part['num_tokens'] == 100 and part['eval_tokens'] == 100
  assert _listing(smoke_run) == before  # Nothing written into the run.


def test_eval_refuses_model_overrides_and_missing_steps(smoke_run):
  from research.eval_run import evaluate_run
  from research.runs import RunError
  from research.config import ConfigError
  with pytest.raises(ConfigError, match='model comes from the run directory'):
    evaluate_run(smoke_run, -1, {'model.d_model': 64})
  with pytest.raises(RunError, match=r'step 4 is not in .* \(steps: \[3, 6\]\)'):
    evaluate_run(smoke_run, 4)


def test_eval_and_generate_commands(smoke_run, tmp_path):
  """The two commands as a user runs them: JSON on stdout, --write_metrics appends."""
  piqa = tmp_path / 'piqa.jsonl'
  piqa.write_text(''.join(json.dumps({'goal': f'g{i}', 'sol1': 'a', 'sol2': 'bb',
                                      'label': i % 2}) + '\n' for i in range(4)))
  out = tmp_path / 'e.json'
  r = run_cli(['launch.eval', f'--run={smoke_run}', '--step=3', '--eval_tokens=-1',
               '--config.batch_size=4', f'--tasks=p=piqa:{piqa}', f'--out={out}',
               '--write_metrics'])
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout)
  assert got == json.loads(out.read_text())
  assert got['step'] == 3 and got['eval_tokens'] == -1 and got['num_tokens'] > 1000
  assert got['tasks']['p']['n'] == 4 and got['tasks']['p']['chance'] == 0.5
  with open(os.path.join(smoke_run, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f][-2:]
  assert [x['split'] for x in rows] == ['posthoc_eval', 'downstream/p']
  assert rows[0]['loss'] == got['loss'] and rows[1]['acc'] == got['tasks']['p']['acc']

  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def f(x):\\n    return\nimport \n')
  r = run_cli(['launch.generate', f'--run={smoke_run}', f'--prompts_file={prompts}',
               '--max_new_tokens=8', '--greedy'])
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [json.loads(x) for x in r.stdout.splitlines()]
  assert [x['prompt'] for x in lines] == ['def f(x):\n    return', 'import ']
  assert all(x['step'] == 6 and x['new_tokens'] <= 8 for x in lines)

  r = run_cli(['launch.eval', f'--run={tmp_path}'])
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith('error: --run=')


def test_generate_is_repeatable_and_greedy_is_argmax(smoke_run):
  from research.generation import generate_from_run
  a = generate_from_run(smoke_run, ['x = ', 'def '], max_new_tokens=6, temperature=1.0,
                        top_k=0, seed=3)
  b = generate_from_run(smoke_run, ['x = ', 'def '], max_new_tokens=6, temperature=1.0,
                        top_k=0, seed=3)
  assert a == b
  g = generate_from_run(smoke_run, ['x = '], max_new_tokens=6, temperature=0.0)[0]
  from research import run_source
  from research.decode import generate
  loaded = run_source.load(smoke_run)
  with run_source.use_mesh(loaded):
    want = generate(loaded.model, loaded.tokenizer.encode('x = ')[None], max_new_tokens=6)
  new = [int(t) for t in want[0, 4:]]
  if loaded.tokenizer.eos_id in new:
    new = new[:new.index(loaded.tokenizer.eos_id)]
  assert g['completion'] == loaded.tokenizer.decode(new)


# --------------------------------------------------------------------------- HF


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  path = str(tmp_path_factory.mktemp('hf') / 'llama')
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['def f(x):\n    return x + 1\n', 'import os, sys\n'] * 20,
                          trainers.BpeTrainer(vocab_size=290, special_tokens=[
                              '<unk>', '<s>', '</s>'],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rope_theta=500.0, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  tok.save(os.path.join(path, 'tokenizer.json'))
  return path, model


def test_hf_directory_scores_equal_transformers_loglikelihoods(hf_dir):
  import torch
  from research import run_source
  from research.downstream import scoring
  path, hf = hf_dir
  loaded = run_source.load(path)
  assert loaded.kind == 'hf' and loaded.step is None and loaded.context_len == 128
  requests = [('def f(x):', '\n    return x + 1'), ('import', ' os, sys')]
  with run_source.use_mesh(loaded):
    lls, _ = scoring.loglikelihoods(loaded.model, loaded.tokenizer, requests, max_len=128)
  for (c, x), got in zip(requests, lls):
    ctx, cont = scoring.encode_pair(loaded.tokenizer, c, x)
    ids = torch.tensor(np.concatenate([ctx, cont])[None])
    with torch.no_grad():
      logp = torch.log_softmax(hf(ids).logits.float(), -1)[0].numpy()
    want = sum(logp[len(ctx) - 1 + j, cont[j]] for j in range(len(cont)))
    assert got == pytest.approx(float(want), abs=1e-4)


def test_hf_directory_eval_and_greedy_generation(hf_dir):
  import torch
  from research.eval_run import evaluate_run
  from research.generation import generate_from_run
  path, hf = hf_dir
  from research.config import ConfigError
  with pytest.raises(ConfigError, match='batch_size=4 must be a multiple of the 8 data'):
    evaluate_run(path, overrides={'eval_tokens': 256, 'seq_len': 64, 'batch_size': 4})
  got = evaluate_run(path, overrides={'eval_tokens': 256, 'seq_len': 64, 'batch_size': 8})
  assert got['kind'] == 'hf' and got['step'] is None and got['num_tokens'] == 256
  assert np.isfinite(got['loss']) and got['loss'] > 0
  from research.models.hf_import import HFTokenizer
  tok = HFTokenizer(path)
  prompt = 'def f(x):'
  row = generate_from_run(path, [prompt], max_new_tokens=12, temperature=0.0)[0]
  ids = torch.tensor(tok.encode(prompt)[None].astype(np.int64))
  with torch.no_grad():
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                       eos_token_id=2).numpy()[0, ids.shape[1]:].tolist()
  if 2 in want:
    want = want[:want.index(2)]
  assert row['completion'] == tok.decode(want) and row['new_tokens'] == len(want)


def test_write_metrics_is_refused_for_hf_directories(hf_dir):
  path, _ = hf_dir
  r = run_cli(['launch.eval', f'--run={path}', '--write_metrics', '--nolm_eval'])
  assert r.returncode == 1
  assert 'read-only source' in r.stderr.strip().splitlines()[-1]
