"""Token store: parallel preparation, JSONL/Parquet sources, the cache, bad inputs (one
line or a logged warning, never a traceback), document masking and exact eval budgets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from research.config import ConfigError, base_config, override
from research.data import catalog, pipeline, sources, token_store, tokenizers
from tests.helpers import REPO

BYTES = tokenizers.ByteTokenizer()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  """Every test prepares into its own cache (never ~/.cache)."""
  monkeypatch.setenv('RESEARCH_DATA_CACHE', str(tmp_path / 'cache'))
  pipeline._STORES.clear()
  return tmp_path / 'cache'


def cfg(**overrides):
  c = base_config()
  c.seq_len, c.batch_size = 16, 4
  override(c, overrides)
  return c


def words(rng, n):
  vocab = 'alpha beta gamma delta épsilon zeta eta theta\n'.split(' ')
  return ' '.join(rng.choice(vocab, size=n))


def write_texts(root, n=12, seed=0):
  rng = np.random.default_rng(seed)
  texts = {}
  for i in range(n):
    path = root / f'd{i % 3}' / f'f{i:02d}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    texts[f'd{i % 3}/f{i:02d}.txt'] = t = words(rng, int(rng.integers(20, 400)))
    path.write_text(t, encoding='utf-8')
  return texts


def store_stream(directory, split):
  return token_store.open_split(str(directory), split, BYTES).tokens()


# ------------------------------------------------------------------ preparation


def test_parallel_prepare_equals_in_process_and_the_documents(tmp_path, monkeypatch):
  write_texts(tmp_path / 'c', n=16)
  c = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/c/**/*.txt',
             'data.eval_fraction': 0.25})
  monkeypatch.setattr(token_store, '_POOL_MIN_BYTES', 0)  # Force the spawn pool.
  monkeypatch.setattr(token_store, '_groups', lambda items, w: [[x] for x in items])
  m2 = token_store.prepare(c.data, BYTES, str(tmp_path / 's2'), workers=2)
  monkeypatch.setattr(token_store, '_POOL_MIN_BYTES', 1 << 60)
  m1 = token_store.prepare(c.data, BYTES, str(tmp_path / 's1'), workers=1)
  assert m2['prepare']['workers'] == 2 and m1['prepare']['workers'] == 1
  for split in ('train', 'eval'):
    assert len(m2['splits'][split]['shards']) > 1
    want = BYTES.encode_documents(list(sources.file_documents(c.data, split)))
    np.testing.assert_array_equal(store_stream(tmp_path / 's2', split), want)
    np.testing.assert_array_equal(store_stream(tmp_path / 's1', split), want)
    ends = token_store.open_split(str(tmp_path / 's2'), split, BYTES).doc_ends()
    assert len(ends) == m2['splits'][split]['docs'] and ends[-1] == len(want)
    assert (want[ends - 1] == BYTES.eos_id).all()  # Every document ends with EOS.
  assert m1['splits'] == m2['splits'] or all(
      m1['splits'][s]['tokens'] == m2['splits'][s]['tokens'] for s in m1['splits'])


def test_jsonl_and_parquet_sources(tmp_path, caplog):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(1)
  recs = [{'text': words(rng, int(rng.integers(1, 50))), 'id': i} for i in range(200)]
  (tmp_path / 'j').mkdir()
  with open(tmp_path / 'j' / 'a.jsonl', 'w') as f:
    for r in recs:
      f.write(json.dumps(r) + '\n')
    f.write('{"id": 1}\nnot json\n\n')  # Two bad records, one blank line.
  (tmp_path / 'p').mkdir()
  pq.write_table(pa.table({'text': [r['text'] for r in recs], 'id': list(range(200))}),
                 tmp_path / 'p' / 'a.parquet', row_group_size=37)
  streams = {}
  for src, path in [('jsonl', 'j/*.jsonl'), ('parquet', 'p/*.parquet')]:
    c = cfg(**{'data.source': src, 'data.path': f'{tmp_path}/{path}', 'data.eval_fraction': 0.1})
    catalog.validate_data_config(c.data)
    with caplog.at_level(logging.WARNING):
      for split in ('train', 'eval'):
        streams[src, split] = pipeline.token_stream(c.data, BYTES, split)
    assert sources.file_corpus(c.data).mode == 'tail'  # One file: split by its tail.
    batch = next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4))
    assert batch['inputs'].shape == (4, 16)
  texts = [r['text'] for r in recs]
  both = np.concatenate([streams['parquet', 'train'], streams['parquet', 'eval']])
  np.testing.assert_array_equal(both, BYTES.encode_documents(texts))
  assert len(streams['parquet', 'eval']) < 0.2 * len(both)
  jboth = np.concatenate([streams['jsonl', 'train'], streams['jsonl', 'eval']])
  np.testing.assert_array_equal(jboth, BYTES.encode_documents(texts))
  assert "skipped 2 record(s) that are not valid JSON or have no string field 'text'" in caplog.text
  with pytest.raises(ConfigError, match=r"data.text_key='body' is not a column of a.parquet"):
    catalog.validate_data_config(cfg(**{'data.source': 'parquet', 'data.text_key': 'body',
                                        'data.path': f'{tmp_path}/p/*.parquet'}).data)
  with pytest.raises(ConfigError, match=r"data.text_key='body' is not a field"):
    catalog.validate_data_config(cfg(**{'data.source': 'jsonl', 'data.text_key': 'body',
                                        'data.path': f'{tmp_path}/j/*.jsonl'}).data)


def test_tokens_source_trains_on_the_same_batches_and_cache_is_reused(tmp_path, cache_dir):
  texts = write_texts(tmp_path / 'c')
  raw = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/c/**/*.txt'})
  first = pipeline.make_lm_iterator(raw, BYTES, 'train', batch_size_per_process=4)
  cached = os.listdir(cache_dir)
  assert len([d for d in cached if not d.endswith('.lock')]) == 1
  store = token_store.ensure_store(raw.data, BYTES)
  assert os.path.dirname(store) == str(cache_dir)  # Never inside the corpus.
  assert not any('manifest' in f for _, _, fs in os.walk(tmp_path / 'c') for f in fs)
  mtime = os.path.getmtime(os.path.join(store, 'manifest.json'))
  assert token_store.ensure_store(raw.data, BYTES) == store  # Reused, not prepared again.
  assert os.path.getmtime(os.path.join(store, 'manifest.json')) == mtime
  # An edited file is another source: a new store.
  (tmp_path / 'c' / 'd0' / 'f00.txt').write_text(texts['d0/f00.txt'] + ' more')
  sources._file_corpus.cache_clear()
  assert token_store.ensure_store(raw.data, BYTES) != store
  (tmp_path / 'c' / 'd0' / 'f00.txt').write_text(texts['d0/f00.txt'])

  out = tmp_path / 'store'
  r = subprocess.run([sys.executable, '-m', 'launch.prepare_data',
                      '--config=experiments/pretrain/tiny.py', f'--out={out}',
                      '--config.data.source=text_files', f'--config.data.path={tmp_path}/c/**/*.txt'],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'train with --config.data.source=tokens' in r.stdout
  assert 'text_files 12 files (' in r.stderr and 'split by tail: train ' in r.stderr
  tok = cfg(**{'data.source': 'tokens', 'data.path': str(out)})
  catalog.validate_data_config(tok.data)
  a = [next(first) for _ in range(3)]
  it = pipeline.make_lm_iterator(tok, BYTES, 'train', batch_size_per_process=4)
  for x in a:
    y = next(it)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  info = catalog.corpus_info(tok.data)
  assert info['store_source']['source'] == 'text_files' and info['train_tokens'] > 0


def test_store_made_with_another_tokenizer_is_one_line(tmp_path):
  write_texts(tmp_path / 'c')
  c = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/c/**/*.txt'})
  token_store.prepare(c.data, BYTES, str(tmp_path / 's'))

  class Other(tokenizers.ByteTokenizer):
    fingerprint = 'spm-0123456789abcdef'

  tok = cfg(**{'data.source': 'tokens', 'data.path': str(tmp_path / 's')})
  with pytest.raises(token_store.StoreError) as e:
    pipeline.make_lm_iterator(tok, Other(), 'train', batch_size_per_process=4)
  msg = str(e.value)
  assert '\n' not in msg and "tokenized with 'bytes-v1'" in msg and 'prepare_data' in msg
  with pytest.raises(ConfigError, match='is not a token store'):
    catalog.validate_data_config(cfg(**{'data.source': 'tokens',
                                        'data.path': str(tmp_path / 'c')}).data)


# ------------------------------------------------------------------- bad inputs


def test_bad_inputs_warn_with_counts_and_files(tmp_path, caplog):
  d = tmp_path / 'c'
  d.mkdir()
  (d / 'a.txt').write_text('hello world\n' * 50)
  (d / 'b.txt').write_bytes(b'\x7fELF\x00\x01\x02' + bytes(range(256)))  # Binary.
  (d / 'c.txt').write_bytes(b'caf\xe9 na\xefve \xff\xfe ok\n' * 3)  # Latin-1, not UTF-8.
  (d / 'e.txt').write_bytes(b'')
  c = cfg(**{'data.source': 'text_files', 'data.path': f'{d}/*.txt', 'data.eval_fraction': 0.5})
  with caplog.at_level(logging.WARNING):
    toks = [pipeline.token_stream(c.data, BYTES, s) for s in ('train', 'eval')]
  text = BYTES.decode(np.concatenate(toks))
  assert 'ELF' not in text and 'hello world' in text and 'caf\ufffd' in text
  log = caplog.text
  assert 'skipped 1 binary file(s) (NUL bytes; first: b.txt)' in log
  assert 'invalid UTF-8: 12 byte(s) replaced by U+FFFD (first in c.txt)' in log
  assert '1 empty file(s) contribute no text (first: e.txt)' in log


def test_short_file_warns_with_sizes_and_empty_file_is_one_line(tmp_path, caplog):
  (tmp_path / 'short.txt').write_text('0123456789')
  c = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/short.txt'})
  with caplog.at_level(logging.WARNING):
    batch = next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4))
  assert (batch['mask'].sum(1) == 9).all()  # 9 train bytes + EOS -> 9 targets per window.
  assert 'has 10 tokens, shorter than one window of seq_len+1=17 tokens' in caplog.text
  (tmp_path / 'empty.txt').write_bytes(b'')
  e = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/empty.txt'})
  with pytest.raises(ConfigError) as err:
    next(pipeline.make_lm_iterator(e, BYTES, 'train', batch_size_per_process=4))
  assert '\n' not in str(err.value) and 'has no text' in str(err.value)
  # The command line: one error line last, no traceback.
  r = subprocess.run([sys.executable, '-m', 'launch.prepare_data',
                      '--config=experiments/pretrain/tiny.py', f'--out={tmp_path / "s"}',
                      '--config.data.source=jsonl', f'--config.data.path={tmp_path}/empty.txt'],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: ')


# ------------------------------------------------------------- document masking


def test_document_masking_segments_and_positions(tmp_path):
  (tmp_path / 'c').mkdir()
  docs = ['abc', 'defghij', 'k', 'lmnopqrstuvwxyz0123']
  with open(tmp_path / 'c' / 'a.jsonl', 'w') as f:
    for t in docs * 4:
      f.write(json.dumps({'text': t}) + '\n')
  c = cfg(**{'data.source': 'jsonl', 'data.path': f'{tmp_path}/c/*.jsonl',
             'data.document_masking': True, 'seq_len': 8})
  ev = list(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4,
                                      shuffle=False, repeat=False))
  b = ev[0]
  assert b['segment_ids'].dtype == np.int32 and b['positions'].dtype == np.int32
  # Stream: abc| defghij| k| lmnop... ('|' = EOS, which belongs to the document it ends).
  np.testing.assert_array_equal(b['segment_ids'][0], [1, 1, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(b['positions'][0], [0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_array_equal(b['segment_ids'][1], [1, 1, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(b['positions'][1], [0, 1, 2, 3, 0, 1, 0, 1])  # Row start: 0.
  # Padding rows: segment 0, position 0.
  last = ev[-1]
  pad = last['mask'].sum(1) == 0
  assert pad.any() and (last['segment_ids'][pad] == 0).all()
  assert (last['positions'][pad] == 0).all()
  off = next(pipeline.make_lm_iterator(cfg(**{'data.source': 'jsonl', 'seq_len': 8,
                                              'data.path': f'{tmp_path}/c/*.jsonl'}),
                                       BYTES, 'train', batch_size_per_process=4))
  assert set(off) == {'inputs', 'targets', 'mask'}


def test_packed_second_document_has_the_logits_of_the_document_alone(tmp_path):
  """Model side of document masking (segment_ids_BL/positions_BL), fed by the pipeline."""
  import jax.numpy as jnp
  from flax import nnx
  from research.models.transformer import Transformer
  (tmp_path / 'c').mkdir()
  docs = ['first document, long enough', 'second: def f(x): return x']
  with open(tmp_path / 'c' / 'a.jsonl', 'w') as f:
    for t in docs:
      f.write(json.dumps({'text': t}) + '\n')
  c = cfg(**{'data.source': 'jsonl', 'data.path': f'{tmp_path}/c/*.jsonl',
             'data.document_masking': True, 'seq_len': 64, 'data.eval_fraction': 0.01})
  c.model.update(vocab_size=BYTES.vocab_size, d_model=32, num_heads=4, mlp_dim=64,
                 max_seq_len=64, num_layers=2)
  [b] = list(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=1,
                                       shuffle=False, repeat=False))
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  packed = model(jnp.asarray(b['inputs']), segment_ids_BL=jnp.asarray(b['segment_ids']),
                 positions_BL=jnp.asarray(b['positions']), deterministic=True)
  seg2 = b['segment_ids'][0] == 2
  alone = model(jnp.asarray(b['inputs'][:, seg2]), deterministic=True)
  np.testing.assert_allclose(np.asarray(packed)[0, seg2], np.asarray(alone)[0], atol=1e-5)
  unmasked = model(jnp.asarray(b['inputs']), deterministic=True)
  assert np.abs(np.asarray(unmasked)[0, seg2] - np.asarray(alone)[0]).max() > 1e-3
