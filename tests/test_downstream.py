"""Downstream evaluation: the multiple-choice scorer against hand-computed sums, the
harness's encoding and normalisation, the readers of each shape (JSONL and TFDS mock
data), Wilson intervals, metrics rows, and the offline stdlib task (deterministic, held
out by the corpus split)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from research.config import base_config
from research.data.tokenizers import ByteTokenizer
from research.downstream import readers, results, scoring, stats, stdlib_task, tasks
from research.models.transformer import Transformer


def _byte_model(max_seq_len: int = 64) -> Transformer:
  c = base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.mlp_dim = 259, 32, 2, 4, 64
  c.max_seq_len, c.dtype = max_seq_len, 'float32'
  return Transformer(c, rngs=nnx.Rngs(0))


def _hand_ll(model, ctx_ids, cont_ids, max_len):
  """log p(cont | ctx) from one full forward in numpy: the sum the harness computes."""
  seq = np.concatenate([ctx_ids, cont_ids])[-(max_len + 1):]
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, seq[None, :-1]))[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  n = min(len(cont_ids), len(seq) - 1)
  return float(sum(logp[len(seq) - 1 - n + j, seq[len(seq) - n + j]] for j in range(n)))


def test_loglikelihood_equals_hand_computed_sums():
  model, tok = _byte_model(), ByteTokenizer()
  requests = [('def f(x):\n', '    return x\n'), ('', 'import os'),
              ('x' * 100, ' = 1'),  # Left-truncated to max_len.
              ('a = 1', 'b' * 70)]  # Continuation alone longer than max_len.
  lls, greedy = scoring.loglikelihoods(model, tok, requests, max_len=48, batch_size=3)
  for (c, x), got in zip(requests, lls):
    ctx, cont = scoring.encode_pair(tok, c, x)
    want = _hand_ll(model, ctx, cont, 48)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4), (c[:10], x[:10])
  assert lls.dtype == np.float64 and greedy.dtype == bool
  # The empty context is EOS (a new document) and the score does not depend on the batch.
  assert scoring.encode_pair(tok, '', 'a')[0].tolist() == [tok.eos_id]
  again, _ = scoring.loglikelihoods(model, tok, requests[::-1], max_len=48, batch_size=1)
  np.testing.assert_allclose(again[::-1], lls, rtol=1e-5, atol=1e-5)


def test_encode_pair_moves_trailing_space_like_the_harness():
  tok = ByteTokenizer()
  ctx, cont = scoring.encode_pair(tok, 'Answer: ', 'yes')
  assert tok.decode(ctx) == 'Answer:' and tok.decode(cont) == ' yes'


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8():
  # acc takes the larger sum; acc_norm the larger sum per character.
  assert scoring.predictions(np.array([-10.0, -12.0]), ['a', 'bbbbbb']) == (0, 1, 1)
  # 'é' is 1 character but 2 bytes: -3/2 per char vs -2.5/2 per... byte view flips.
  p, pn, pb = scoring.predictions(np.array([-3.0, -2.5]), ['éé', 'ab'])
  assert (p, pn, pb) == (1, 1, 0)  # -1.5/char vs -1.25; bytes: -0.75 vs -1.25.


def test_score_reports_acc_and_acc_norm_per_example():
  model, tok = _byte_model(), ByteTokenizer()
  exs = [scoring.MCExample('Q: 1+1\nA:', ('2', 'two hundred and twelve'), 0),
         scoring.MCExample('x = ', ('1', '2', '3'), 2, delimiter='')]
  r = scoring.score(model, tok, exs, max_len=32)
  lls, _ = scoring.loglikelihoods(model, tok, [('Q: 1+1\nA:', ' 2'),
                                               ('Q: 1+1\nA:', ' two hundred and twelve')],
                                  max_len=32)
  np.testing.assert_allclose(r.lls[0], lls, rtol=1e-6)
  assert r.acc[0] == float(np.argmax(lls) == 0)
  assert r.acc_norm[0] == float(np.argmax(lls / np.array([1, 22])) == 0)
  assert len(r.lls[1]) == 3


def test_wilson_interval_known_values():
  lo, hi = stats.wilson_interval(50, 100)
  assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
  lo, hi = stats.wilson_interval(0, 20)
  assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def test_jsonl_readers_of_each_shape(tmp_path):
  hs = _write_jsonl(tmp_path / 'hs.jsonl', [
      {'ctx': 'A man sits', 'endings': ['a', 'b', 'c', 'd'], 'label': 2},
      {'activity_label': 'Cooking', 'ctx_a': 'He cuts.', 'ctx_b': 'then he',
       'endings': ['e [title] x', 'f', 'g', 'h'], 'label': '0'},
      {'ctx': 'unlabelled test row', 'endings': ['a', 'b'], 'label': ''}])
  ex, skipped = readers.read_jsonl('hellaswag', hs)
  assert skipped == 1 and [e.label for e in ex] == [2, 0]
  assert ex[0].context == 'A man sits' and ex[0].choices == ('a', 'b', 'c', 'd')
  assert ex[1].context == 'Cooking: He cuts. Then he' and ex[1].choices[0] == 'e. x'

  arc = _write_jsonl(tmp_path / 'arc.jsonl', [
      {'id': 'q1', 'question': 'Which is a gas?',
       'choices': {'text': ['ice', 'steam', 'rock'], 'label': ['A', 'B', 'C']},
       'answerKey': 'B'},
      {'question': 'Numbered', 'choices': {'text': ['x', 'y'], 'label': ['1', '2']},
       'answerKey': '2'},
      {'question': 'Bad key', 'choices': {'text': ['x'], 'label': ['A']}, 'answerKey': 'E'}])
  ex, skipped = readers.read_jsonl('arc', arc)
  assert skipped == 1 and [e.label for e in ex] == [1, 1]
  assert ex[0].context == 'Question: Which is a gas?\nAnswer:' and ex[0].delimiter == ' '

  piqa = _write_jsonl(tmp_path / 'piqa.jsonl', [
      {'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'eat it', 'label': 0}])
  ex, _ = readers.read_jsonl('piqa', piqa)
  assert ex[0].choices == ('twist the lid', 'eat it') and ex[0].label == 0

  with pytest.raises(readers.TaskError, match='not in the piqa shape'):
    readers.read_jsonl('piqa', arc)
  with pytest.raises(readers.TaskError, match='no such file'):
    readers.read_jsonl('arc', str(tmp_path / 'missing.jsonl'))


def test_tfds_readers_under_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    ex, skipped = readers.read_tfds('piqa')
    assert len(ex) + skipped == 6 and all(len(e.choices) == 2 for e in ex)
    ex, skipped = readers.read_tfds('arc', 'ai2_arc/ARC-Easy', 'test')
    assert len(ex) + skipped == 6  # Mock answer keys may fall outside the choices.
    assert all(0 <= e.label < len(e.choices) for e in ex)
  with pytest.raises(readers.TaskError, match='TFDS has no hellaswag'):
    readers.read_tfds('hellaswag')


def test_task_specs():
  s = tasks.parse_specs('stdlib_mc,easy=arc:tfds:ai2_arc/ARC-Easy:test,piqa:/d/p.jsonl')
  assert [(x.name, x.kind, x.source) for x in s] == [
      ('stdlib_mc', 'stdlib_mc', ''), ('easy', 'arc', 'tfds'), ('piqa', 'piqa', '/d/p.jsonl')]
  assert (s[1].tfds_name, s[1].tfds_split) == ('ai2_arc/ARC-Easy', 'test')
  for bad, msg in (('mmlu', 'unknown task'), ('arc', 'needs a source'),
                   ('arc:a.jsonl,arc:b.jsonl', 'two tasks named'),
                   ('stdlib_mc:x', 'takes no source')):
    with pytest.raises(readers.TaskError, match=msg):
      tasks.parse_specs(bad)


def test_metrics_rows_and_sweep_columns(tmp_path):
  model, tok = _byte_model(), ByteTokenizer()
  path = _write_jsonl(tmp_path / 'p.jsonl', [
      {'goal': f'goal {i}', 'sol1': 'yes', 'sol2': 'no no', 'label': i % 2} for i in range(6)])
  out = tasks.run_tasks(tasks.parse_specs(f'p=piqa:{path}'), model, tok, max_len=32)
  r = out['p']
  assert r['n'] == 6 and r['chance'] == 0.5 and r['ci'] == 'wilson95'
  assert r['acc_low'] <= r['acc'] <= r['acc_high']
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'split': 'train', 'loss': 2}) + '\n')
  results.append_rows(str(run), results.rows(out, 100))
  results.append_rows(str(run), results.rows({'p': {**r, 'acc': 0.9}}, 200))
  results.append_rows(str(run), results.rows({'p': {**r, 'acc': 0.7}}, 200))  # Supersedes.
  cols = results.downstream_columns(str(run))
  assert cols['p/acc'] == 0.7 and cols['p/step'] == 200 and 'p/acc_low' in cols
  assert sorted(results.downstream_rows(str(run))['p']) == [100, 200]
  assert results.downstream_columns(str(tmp_path)) == {}


@pytest.fixture(scope='module')
def stdlib():
  return stdlib_task.build(0.05)


def test_stdlib_task_is_held_out_by_the_corpus_split(stdlib):
  from research.data import functions_task, sources
  assert stdlib.info['examples'] >= 500 and stdlib.info['chance'] == 0.25
  train_texts = {f.text.strip() for f in functions_task.stdlib_functions()
                 if not sources.path_in_eval(f.path, 0.05)}
  for (path, distractor_paths), ex in zip(stdlib.provenance, stdlib.examples):
    assert sources.path_in_eval(path, 0.05)
    assert all(sources.path_in_eval(p, 0.05) and p != path for p in distractor_paths)
    assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
    indents = {c[:len(c) - len(c.lstrip())] for c in ex.choices}
    assert len(indents) == 1  # Same indentation: layout gives nothing away.
    assert ex.context.splitlines()[0].lstrip().startswith(('def ', 'async def '))
    assert ex.context.strip() not in train_texts
  labels = np.bincount([e.label for e in stdlib.examples], minlength=4) / len(stdlib.examples)
  assert labels.min() > 0.2  # The answer position is spread over the four slots.


def test_stdlib_task_is_deterministic(stdlib):
  stdlib_task.build.cache_clear()
  again = stdlib_task.build(0.05)
  assert again.info['fingerprint'] == stdlib.info['fingerprint']
  assert again.examples == stdlib.examples
  other = stdlib_task.build(0.1)  # Another split holds out other files.
  assert other.info['fingerprint'] != stdlib.info['fingerprint']


def test_evaluate_rows_for_a_training_loop(tmp_path):
  model, tok = _byte_model(), ByteTokenizer()
  path = _write_jsonl(tmp_path / 'p.jsonl', [
      {'goal': 'g', 'sol1': 'yes', 'sol2': 'no', 'label': 1}] * 3)
  c = base_config()
  c.seq_len, c.model.max_seq_len = 32, 64
  rows = tasks.evaluate_rows(f'piqa:{path}', model, tok, c, step=7)
  assert [(r['step'], r['split'], r['n']) for r in rows] == [(7, 'downstream/piqa', 3)]
  assert rows[0]['acc'] in (0.0, 1.0)  # Three identical examples: all right or all wrong.
