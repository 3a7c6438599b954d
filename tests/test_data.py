"""Data pipeline: tokenizers, sources (stdlib, text files, TFDS mocked), packing,
determinism, multi-process sharding and exact checkpoint resume."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import time

import grain
import numpy as np
import pytest

from research.config import ConfigError, base_config, override
from research.data import catalog, pipeline, sources, tokenizers

BYTES = tokenizers.ByteTokenizer()


def cfg(**overrides):
  c = base_config()
  c.seq_len, c.batch_size = 16, 4
  override(c, overrides)
  return c


@pytest.fixture(autouse=True, scope='module')
def _token_cache(tmp_path_factory):
  """Token stores of this module's sources go to a temporary cache, not ~/.cache."""
  old = os.environ.get('RESEARCH_DATA_CACHE')
  os.environ['RESEARCH_DATA_CACHE'] = str(tmp_path_factory.mktemp('token_cache'))
  pipeline._STORES.clear()
  yield
  if old is None:
    os.environ.pop('RESEARCH_DATA_CACHE', None)
  else:
    os.environ['RESEARCH_DATA_CACHE'] = old
  pipeline._STORES.clear()


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def text_dir(tmp_path):
  """24 small text files in nested folders (real text: stdlib sources)."""
  corpus = sources.file_corpus(cfg().data)
  rels = corpus.rel_paths[:24]
  for i, rel in enumerate(rels):
    with open(os.path.join(corpus.root, rel), encoding='utf-8', errors='replace') as f:
      text = f.read()[:3000]
    path = tmp_path / 'corpus' / f'd{i % 3}' / f'f{i:02d}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding='utf-8')
  return tmp_path / 'corpus'


def files_cfg(text_dir, **overrides):
  return cfg(**{'data.source': 'text_files', 'data.path': f'{text_dir}/**/*.txt',
                'data.eval_fraction': 0.25, **overrides})


# ------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
  text = 'def f(x):\n\treturn x  # héllo ✓ 中文\n'
  ids = BYTES.encode(text)
  assert ids.dtype == np.int32 and BYTES.vocab_size == 259
  assert ids.min() >= 3 and ids.max() < 259
  np.testing.assert_array_equal(ids, np.frombuffer(text.encode(), np.uint8) + 3)
  assert BYTES.decode(ids) == text
  assert BYTES.decode([BYTES.bos_id, *ids.tolist(), BYTES.eos_id, 0, 0]) == text
  assert BYTES.decode([0xFF + 3]) == '\ufffd'  # Invalid UTF-8 is replaced, not raised.
  docs = BYTES.encode_documents(['ab', '', 'c'])
  np.testing.assert_array_equal(docs, [100, 101, 2, 2, 102, 2])


def test_sentencepiece_trains_saves_and_round_trips(text_dir, tmp_path):
  c = files_cfg(text_dir, **{'data.tokenizer': 'sentencepiece', 'data.spm_vocab_size': 400,
                             'data.spm_train_chars': 40_000})
  workdir = str(tmp_path / 'run')
  tok = tokenizers.make_tokenizer(c.data, workdir)
  assert os.path.exists(os.path.join(workdir, 'tokenizer', 'spm.model'))
  assert tok.vocab_size == 400
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  text = 'class A:\n    def f(self):\n        return "✓ 中文"  # unseen chars: byte fallback\n'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id, tok.pad_id]) == text
  assert len(ids) < len(text.encode())  # It compresses.
  again = tokenizers.make_tokenizer(c.data, workdir)  # A resumed run loads the file.
  assert again.fingerprint == tok.fingerprint
  assert pickle.loads(pickle.dumps(tok)).encode(text).tolist() == ids.tolist()
  c.data.spm_vocab_size = 500
  with pytest.raises(ConfigError, match='data.spm_vocab_size'):
    tokenizers.make_tokenizer(c.data, workdir)


def test_tokenizer_config_errors():
  with pytest.raises(ConfigError, match=r"data.tokenizer='wordpiece' is unknown.*bytes"):
    tokenizers.make_tokenizer(cfg(**{'data.tokenizer': 'wordpiece'}).data, None)
  with pytest.raises(ConfigError, match='data.spm_vocab_size'):
    tokenizers.make_tokenizer(
        cfg(**{'data.tokenizer': 'sentencepiece', 'data.spm_vocab_size': 100}).data, None)


# ---------------------------------------------------------------------- sources


def test_stdlib_split_is_deterministic_disjoint_and_fingerprinted():
  c = cfg()
  corpus = sources.file_corpus(c.data)
  train, ev = corpus.split_paths('train'), corpus.split_paths('eval')
  assert train and ev and not set(train) & set(ev)
  assert sorted(train + ev) == list(corpus.rel_paths)
  assert not any(part in ('test', 'tests', 'idle_test', 'site-packages')
                 for r in corpus.rel_paths for part in r.split('/'))
  assert 0.02 < len(ev) / len(corpus.rel_paths) < 0.1  # eval_fraction=0.05
  info = catalog.corpus_info(c.data)
  sources._file_corpus.cache_clear()  # Recompute from disk: same answer.
  corpus2 = sources.file_corpus(c.data)
  assert corpus2.split_paths('eval') == ev
  assert catalog.corpus_info(c.data) == info
  assert info['fingerprint'] == corpus.fingerprint and len(info['fingerprint']) == 40
  assert info['train_files'] + info['eval_files'] == info['num_files'] == len(corpus.rel_paths)
  assert info['total_bytes'] > 1_000_000 and info['python_version']
  json.dumps(info)


def test_text_files_glob_split_and_batches(text_dir):
  c = files_cfg(text_dir)
  catalog.validate_data_config(c.data)
  corpus = sources.file_corpus(c.data)
  assert len(corpus.rel_paths) == 24 and corpus.mode == 'files'
  assert corpus.rel_paths[0].startswith('d0/')  # Relative to the glob's root.
  train, ev = corpus.split_paths('train'), corpus.split_paths('eval')
  assert train and ev and not set(train) & set(ev)
  batch = next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4))
  assert batch['inputs'].shape == (4, 16)
  corpus_text = ''.join(sources.file_documents(c.data, 'train'))
  assert BYTES.decode(batch['inputs'][0][:8]) in corpus_text


def test_single_text_file_is_split_by_tail(tmp_path):
  path = tmp_path / 'book.txt'
  path.write_text(''.join(f'line {i}\n' for i in range(1000)))
  c = cfg(**{'data.source': 'text_files', 'data.path': str(path)})
  catalog.validate_data_config(c.data)
  assert sources.file_corpus(c.data).mode == 'tail'
  train = ''.join(sources.file_documents(c.data, 'train'))
  ev = ''.join(sources.file_documents(c.data, 'eval'))
  assert train + ev == path.read_text() and 0.03 < len(ev) / len(train) < 0.07
  assert ev.startswith('line ')


def test_empty_glob_is_a_one_line_config_error(tmp_path):
  c = cfg(**{'data.source': 'text_files', 'data.path': f'{tmp_path}/nothing/**/*.txt'})
  with pytest.raises(ConfigError) as e:
    catalog.validate_data_config(c.data)
  msg = str(e.value)
  assert msg.startswith(f"data.path: glob '{tmp_path}/nothing/**/*.txt' matched no files;")
  assert '\n' not in msg and 'data.source=stdlib' in msg
  c.data.path = ''
  with pytest.raises(ConfigError, match='data.path'):
    catalog.validate_data_config(c.data)


def test_unknown_source_names_the_key():
  with pytest.raises(ConfigError, match=r"data.source='hdfs' is unknown.*stdlib.*text_files.*tfds"):
    catalog.validate_data_config(cfg(**{'data.source': 'hdfs'}).data)


# ------------------------------------------------------------------------- TFDS


def tfds_cfg(**overrides):
  return cfg(**{'data.source': 'tfds', 'data.name': 'tiny_shakespeare', **overrides})


def random_texts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [''.join(rng.choice(list('abcdefgh \n'), size=n)) for n in lengths]


def mock_source(texts):
  """``as_data_source_fn`` for tfds.testing.mock_data: every split holds ``texts``."""
  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    del self, split, decoders, deserialize_method, kwargs
    return [{'text': t.encode()} for t in texts]
  return as_data_source


def test_tfds_mock_gives_batches_without_tensorflow():
  import sys
  import tensorflow_datasets as tfds
  c = tfds_cfg()
  with tfds.testing.mock_data(num_examples=20):
    catalog.validate_data_config(c.data)
    info = catalog.corpus_info(c.data)
    assert info['train_examples'] == 20 and info['eval_split'] == 'validation'
    it = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4)
    for batch in take(it, 5):
      assert {k: v.shape for k, v in batch.items()} == {
          'inputs': (4, 16), 'targets': (4, 16), 'mask': (4, 16)}
      assert batch['inputs'].dtype == np.int32 and batch['mask'].dtype == np.float32
      np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    ev = list(pipeline.make_lm_iterator(c, BYTES, 'eval', batch_size_per_process=4,
                                        shuffle=False, repeat=False))
    assert ev and ev[-1]['mask'].sum() < ev[0]['mask'].sum()  # Padded last batch.
  assert 'tensorflow' not in sys.modules


def test_tfds_one_huge_document_is_packed_into_many_windows():
  import tensorflow_datasets as tfds
  [text] = random_texts([20_000])  # Like tiny_shakespeare: a split is one document.
  with tfds.testing.mock_data(as_data_source_fn=mock_source([text])):
    ev = list(pipeline.make_lm_iterator(tfds_cfg(), BYTES, 'eval', batch_size_per_process=4,
                                        shuffle=False, repeat=False))
  assert len(ev) > 300 // 4
  # Non-overlapping windows of L+1 tokens; all the text comes back, in order.
  rows = np.concatenate([b['inputs'] for b in ev])
  tgt = np.concatenate([b['targets'] for b in ev])
  mask = np.concatenate([b['mask'] for b in ev])
  windows = np.c_[rows[:, :1], tgt].reshape(-1)
  real = np.c_[rows[:, :1] != 0, mask > 0].reshape(-1)
  assert BYTES.decode(windows[real]) == text
  assert (tgt[mask == 0] == 0).all()


@pytest.mark.parametrize('shuffle', [False, True])
def test_tfds_streaming_resume_is_exact(shuffle):
  """The state goes through JSON, as grain.checkpoint writes it."""
  import tensorflow_datasets as tfds
  texts = random_texts([3000, 40, 7000, 500, 90, 1200, 15])
  make = lambda: pipeline.make_lm_iterator(tfds_cfg(), BYTES, 'train',
                                           batch_size_per_process=4, shuffle=shuffle)
  with tfds.testing.mock_data(as_data_source_fn=mock_source(texts)):
    per_epoch = sum(len(t) + 1 for t in texts) // 17 // 4
    ref = take(make(), per_epoch + 8)
    for k in (1, 5, per_epoch - 1, per_epoch + 2):
      it = make()
      take(it, k)
      state = json.loads(json.dumps(it.get_state()))
      it2 = make()
      it2.set_state(state)
      assert_batches_equal(take(it2, 5), ref[k:k + 5])


def _stream_tokens(batches):
  """The non-overlapping L+1 windows of a tfds pass, back as one token stream."""
  rows = np.concatenate([b['inputs'] for b in batches])
  tgt = np.concatenate([b['targets'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  windows = np.c_[rows[:, :1], tgt].reshape(-1)
  real = np.c_[rows[:, :1] != 0, mask > 0].reshape(-1)
  return windows[real]


def test_tfds_processes_read_and_tokenize_disjoint_documents():
  """Process p packs only documents p, p+P, ... (each process tokenizes its share)."""
  import tensorflow_datasets as tfds
  c = tfds_cfg()
  texts = random_texts([500, 300, 700, 90, 410], seed=3)
  with tfds.testing.mock_data(as_data_source_fn=mock_source(texts)):
    kw = dict(shuffle=False, repeat=False)
    parts = [list(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4,
                                            process_index=p, process_count=2, **kw))
             for p in range(2)]
    for p in range(2):
      want = BYTES.encode_documents(texts[p::2])
      np.testing.assert_array_equal(_stream_tokens(parts[p]), want)
      assert all(b['inputs'].shape == (4, 16) for b in parts[p])
    # Shuffled and repeated: still a deal of the shuffled documents, never overlapping.
    its = [pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4,
                                     process_index=p, process_count=2) for p in range(2)]
    assert not np.array_equal(next(its[0])['inputs'], next(its[1])['inputs'])


def test_tfds_prepared_into_a_store_streams_globally(tmp_path):
  """launch.prepare_data also takes a TFDS source: then the order is global again."""
  import tensorflow_datasets as tfds
  from research.data import token_store
  texts = random_texts([500, 300, 700, 90], seed=5)
  with tfds.testing.mock_data(as_data_source_fn=mock_source(texts)):
    m = token_store.prepare(tfds_cfg().data, BYTES, str(tmp_path / 's'))
  assert m['source']['split_mode'] == 'splits' and m['source']['train_examples'] == 4
  for split in ('train', 'eval'):
    np.testing.assert_array_equal(
        token_store.open_split(str(tmp_path / 's'), split, BYTES).tokens(),
        BYTES.encode_documents(texts))
  c = cfg(**{'data.source': 'tokens', 'data.path': str(tmp_path / 's')})
  one = next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4))
  two = [next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=2,
                                        process_index=p, process_count=2)) for p in range(2)]
  np.testing.assert_array_equal(one['inputs'], np.concatenate([b['inputs'] for b in two]))


def test_tfds_offline_not_prepared_error_is_fast_and_helpful(tmp_path):
  c = tfds_cfg(**{'data.tfds_data_dir': str(tmp_path / 'tfds')})
  t0 = time.perf_counter()
  with pytest.raises(ConfigError) as e:
    catalog.validate_data_config(c.data)
  assert time.perf_counter() - t0 < 20  # Never waits on the network.
  msg = str(e.value)
  assert '\n' not in msg
  for part in ("the network is needed to download 'tiny_shakespeare'",
               'data.tfds_data_dir', 'data.source=stdlib / text_files'):
    assert part in msg, msg
  with pytest.raises(ConfigError, match="no dataset named 'no_such_dataset_xyz'"):
    catalog.validate_data_config(tfds_cfg(**{'data.name': 'no_such_dataset_xyz'}).data)
  with pytest.raises(ConfigError, match='data.name'):
    catalog.validate_data_config(tfds_cfg(**{'data.name': ''}).data)


def test_tfds_text_key_error():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ConfigError, match=r"data.text_key='body'.*\['text'\]"):
      catalog.validate_data_config(tfds_cfg(**{'data.text_key': 'body'}).data)


# --------------------------------------------------------------------- pipeline


def test_windows_cover_every_token_once_and_mask_padding(text_dir):
  c = files_cfg(text_dir)
  tokens = pipeline.token_stream(c.data, BYTES, 'eval')
  batches = list(pipeline.make_lm_iterator(c, BYTES, 'eval', batch_size_per_process=4,
                                           shuffle=False, repeat=False))
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(targets[mask > 0], tokens[1:])  # Each target once, in order.
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  assert (targets[mask == 0] == 0).all() and (mask == 0).any()  # Padding is masked.
  # Padding rows completing the last batch are all-pad and fully masked.
  full_rows = -(-(len(tokens) - 1) // 16)
  assert (mask[full_rows:] == 0).all() and (inputs[full_rows:] == 0).all()
  assert len(inputs) % 4 == 0


def test_stdlib_first_batch_and_unigram_entropy():
  c = cfg(**{'seq_len': 64, 'batch_size': 8})
  t0 = time.perf_counter()
  batch = next(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=8))
  assert time.perf_counter() - t0 < 30
  assert batch['inputs'].shape == (8, 64) and batch['mask'].min() == 1.0
  tokens = pipeline.token_stream(c.data, BYTES, 'train')
  assert len(tokens) > 1_000_000 and tokens.dtype == np.uint16
  assert 2.5 < pipeline.unigram_entropy(tokens) < 4.0  # ~3.24 nats/byte on CPython 3.11.


def test_same_seed_same_batches_other_seed_other_order(text_dir):
  def first(seed):
    c = files_cfg(text_dir, seed=seed)
    return take(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4), 3)
  assert_batches_equal(first(0), first(0))
  assert not np.array_equal(first(0)[0]['inputs'], first(1)[0]['inputs'])


def test_each_epoch_is_a_new_permutation(text_dir):
  c = files_cfg(text_dir, **{'batch_size': 1})
  n = -(-(len(pipeline.token_stream(c.data, BYTES, 'train')) - 1) // c.seq_len)
  it = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=1)
  rows = [b['inputs'][0].tobytes() for b in take(it, 2 * n)]
  assert sorted(rows[:n]) == sorted(rows[n:])  # Same windows...
  assert rows[:n] != rows[n:]  # ...in a different order.
  finite = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=1,
                                     num_epochs=2)
  assert len(list(finite)) == 2 * n


def test_checkpoint_resume_get_set_state_across_epochs(text_dir):
  c = files_cfg(text_dir)
  n = -(-(len(pipeline.token_stream(c.data, BYTES, 'train')) - 1) // c.seq_len)
  per_epoch = n // 4
  ref = take(pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4),
             per_epoch + 6)
  for k in (0, 3, per_epoch - 1, per_epoch + 1):  # Including just before an epoch ends.
    it = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    it2 = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4)
    it2.set_state(state)
    assert_batches_equal(take(it2, 5), ref[k:k + 5])


def test_checkpoint_resume_via_grain_checkpoint_and_orbax(text_dir, tmp_path):
  import orbax.checkpoint as ocp
  c = files_cfg(text_dir)
  make = lambda: pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4)
  it = make()
  take(it, 5)
  mgr = ocp.CheckpointManager(str(tmp_path / 'ckpt'),
                              item_handlers={'data': grain.checkpoint.CheckpointHandler()})
  mgr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  want = take(it, 4)
  it2 = make()
  mgr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert_batches_equal(take(it2, 4), want)
  mgr.close()


def test_multi_process_union_equals_single_process_global_batch(text_dir):
  c = files_cfg(text_dir, **{'batch_size': 8})
  for split, kw, n in [('train', {}, 30), ('eval', dict(shuffle=False, repeat=False), None)]:
    one = list(itertools.islice(
        pipeline.make_lm_iterator(c, BYTES, split, batch_size_per_process=8, **kw), n))
    parts = [list(itertools.islice(pipeline.make_lm_iterator(
        c, BYTES, split, batch_size_per_process=4, process_index=p, process_count=2, **kw),
        n)) for p in range(2)]
    assert len(one) == len(parts[0]) == len(parts[1]) > 0
    for g, a, b in zip(one, *parts):
      for k in g:
        np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))
  # Default batch size per process comes from config.batch_size.
  ds = pipeline.make_lm_dataset(c, BYTES, 'train', process_index=1, process_count=2)
  assert next(iter(ds))['inputs'].shape == (4, 16)


# ------------------------------------------------------------------------ eval


class _EvalTask:
  """The LM eval contract of research/evaluate.py: make_iterator + finalize_eval."""

  make_iterator = staticmethod(pipeline.make_lm_iterator)

  @staticmethod
  def finalize_eval(sums):
    return {'loss': float(sums['loss'] / sums['weight'])}


def _eval_fn(model):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, batch):
    m = nnx.merge(graphdef, state)
    logits = m(batch['inputs'], deterministic=True).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch['targets'][..., None], -1)[..., 0]
    return {'loss': (ce * batch['mask']).sum(), 'weight': batch['mask'].sum()}
  return fn, state


def test_eval_over_the_whole_split_or_a_token_budget_is_independent_of_batch_size(text_dir):
  import types
  import jax
  from flax import nnx
  from research import evaluate as eval_lib
  from research.models.transformer import Transformer
  c = files_cfg(text_dir, seq_len=64, **{'data.eval_fraction': 0.1})
  c.model.update(vocab_size=BYTES.vocab_size, d_model=32, num_heads=4, mlp_dim=64,
                 max_seq_len=64, num_layers=1)
  fn, state = _eval_fn(Transformer(c.model, rngs=nnx.Rngs(0)))
  ts = types.SimpleNamespace(state=state)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  n_eval = len(pipeline.token_stream(c.data, BYTES, 'eval'))

  def run(batch_size, eval_tokens, eval_steps=10):
    cc = files_cfg(text_dir, seq_len=64, batch_size=batch_size, eval_tokens=eval_tokens,
                   eval_steps=eval_steps, **{'data.eval_fraction': 0.1})
    return eval_lib.evaluate(cc, _EvalTask, BYTES, fn, ts, sharding, 0, 1)

  whole = [run(b, -1) for b in (4, 8)]
  assert whole[0]['num_tokens'] == whole[1]['num_tokens'] == n_eval - 1
  np.testing.assert_allclose(whole[0]['loss'], whole[1]['loss'], rtol=1e-6)
  budget = [run(b, 1000) for b in (4, 8, 3)]
  assert [r['num_tokens'] for r in budget] == [1000] * 3
  np.testing.assert_allclose([r['loss'] for r in budget], budget[0]['loss'], rtol=1e-6)
  assert abs(budget[0]['loss'] - whole[0]['loss']) > 1e-6  # A prefix, not the split.
  legacy = run(4, 0, eval_steps=2)  # Default: the first eval_steps batches.
  assert legacy['num_tokens'] == 2 * 4 * 64
  assert n_eval > 2000
