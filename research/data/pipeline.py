"""The LM input pipeline on grain: packed windows, shuffled by seed, sharded by process.

Every batch is a dict of numpy arrays for one process:
  ``inputs`` [B, L] int32, ``targets`` [B, L] int32 (inputs shifted by one) and
  ``mask`` [B, L] float32 (1.0 where the target is a real token, 0.0 on padding),
with B = batch_size_per_process and L = config.seq_len. With
``data.document_masking=True`` also ``segment_ids`` [B, L] int32 (1..n for the
documents of the row, 0 on padding; an EOS belongs to the document it ends) and
``positions`` [B, L] int32 (restarting at 0 at the row start and at each document start;
RoPE attention depends only on their differences), so attention stays within a document.

Packing is GPT-style concat-and-chunk: documents are tokenized, each followed by EOS,
concatenated and cut into windows of L+1 tokens. Two paths:

* File sources (``stdlib``, ``text_files``, ``jsonl``, ``parquet``) are tokenized once
  into a token store (research/data/token_store.py: flat binary shards, cached under
  ``data.cache_dir``); ``tokens`` names such a store directly. Window ``w`` is
  ``tokens[w*L : w*L + L + 1]`` (consecutive windows share one token, so every token is
  a target exactly once). The window order is a stateless permutation
  (``MapDataset.shuffle``, re-seeded each epoch) of *global* batches: the global batch
  ``k`` is the same for any process count, process ``p`` reads (one ``pread`` a row) only
  rows ``[p*B, (p+1)*B)`` of it, and the iterator's state is the global batch index, so
  a run resumes on any process count (research/data/iterator_state.py).
* ``tfds`` streams: documents (shuffled by index) are dealt to processes (process ``p``
  takes documents ``p, p+P, ...``), tokenized lazily and packed by grain's
  ``ConcatThenSplitIterDataset`` into non-overlapping windows of L+1 tokens, then mixed
  by a window shuffle buffer. Each process reads and tokenizes only its documents; its
  iterator state is its own (resume with the same process count, or prepare the dataset
  into a store with ``launch.prepare_data`` to resume on any).

Without ``repeat`` the last global batch is completed with all-padding rows (mask 0),
so every batch has a static shape and no data is dropped. ``max_tokens`` (eval) keeps
only the first ``max_tokens`` targets of the split (exactly, for any batch size).
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from research.data import sources, token_store
from research.data.iterator_state import GlobalStateIterator
from research.data.tokenizers import Tokenizer

# tfds path: windows mixed by the shuffle buffer after packing (a restore replays at
# most this many windows). Matters for datasets with few, long documents.
TFDS_WINDOW_SHUFFLE = 1024

_log = logging.getLogger(__name__)
_STORES: dict[tuple, token_store.SplitStore] = {}
_DESCRIBED: set[str] = set()


# ---------------------------------------------------------------- token streams


def open_store(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
               split: str) -> token_store.SplitStore:
  """The token store split of a file or ``tokens`` source (prepared once, then cached).

  The first open in a process logs the source, its split mode and sizes, and any
  warnings found while reading it (binary files, invalid UTF-8, bad records).
  """
  split = sources.resolve_split(data_cfg, split)
  directory = token_store.ensure_store(data_cfg, tokenizer)
  key = (directory, split, tokenizer.fingerprint)
  if key not in _STORES:
    manifest = token_store.read_manifest(directory)
    if directory not in _DESCRIBED:
      _DESCRIBED.add(directory)
      _log.info(token_store.describe(manifest))
      for w in sources.ReadStats(**manifest.get('read', {})).warnings(
          manifest['source']['source'], manifest['source'].get('text_key', 'text')):
        _log.warning(w)
    _STORES[key] = token_store.open_split(directory, split, tokenizer)
  return _STORES[key]


def token_stream(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 split: str) -> np.ndarray:
  """A file split as one in-memory token array, documents each followed by EOS.

  For tests and small corpora; training reads only its windows from the store.
  """
  return open_store(data_cfg, tokenizer, split).tokens()


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats/token of the token frequencies (the loss of a unigram model)."""
  counts = np.bincount(np.asarray(tokens, np.int64))
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def document_layout(inputs: np.ndarray, valid: np.ndarray, eos_id: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``segment_ids`` and ``positions`` [B, L] of packed rows (see the module docstring).

  Derived from the EOS tokens of the row: every document ends with EOS (a tokenizer
  never emits it inside a text), and an EOS belongs to the document it ends.
  """
  is_eos = (inputs == eos_id) & valid
  ends_before = np.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before t.
  segment_ids = np.where(valid, 1 + ends_before, 0).astype(np.int32)
  t = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
  starts = np.zeros(inputs.shape, bool)
  starts[:, 0] = True
  starts[:, 1:] = is_eos[:, :-1]
  first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
  positions = np.where(valid, t - first, 0).astype(np.int32)
  return segment_ids, positions


# ------------------------------------------------------------- shared helpers


class _ProcessRows:
  """Selects this process's rows of a global batch, padding a short last batch."""

  def __init__(self, process_index: int, per_process: int, global_batch: int, fill: Any):
    self.start = process_index * per_process
    self.per_process = per_process
    self.global_batch = global_batch
    self.fill = fill

  def __call__(self, batch: Any) -> Any:
    def rows(x: np.ndarray) -> np.ndarray:
      x = np.asarray(x)
      if len(x) < self.global_batch:  # Last batch of a finite pass.
        pad = np.full((self.global_batch - len(x), *x.shape[1:]), self.fill, x.dtype)
        x = np.concatenate([x, pad])
      return x[self.start:self.start + self.per_process]
    if isinstance(batch, dict):
      return {k: rows(v) for k, v in batch.items()}
    return rows(batch)


class _GatherWindows:
  """Window ids [B] (-1 = padding row) -> the batch dict, reading only those windows."""

  def __init__(self, store: token_store.SplitStore, seq_len: int, pad_id: int, *,
               limit: int, eos_id: int, document_masking: bool):
    self.store = store
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.limit = limit  # Stream positions >= limit are padding (a token budget).
    self.eos_id = eos_id
    self.document_masking = document_masking
    self.offsets = np.arange(seq_len + 1, dtype=np.int64)

  @staticmethod
  def count(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len+1 tokens at stride seq_len covering every target once."""
    return max(1, -(-(num_tokens - 1) // seq_len))

  def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    starts = np.maximum(ids, 0) * self.seq_len
    idx = starts[:, None] + self.offsets[None, :]
    valid = (idx < self.limit) & (ids >= 0)[:, None]
    rows = self.store.windows(np.where(ids >= 0, starts, len(self.store)), self.seq_len + 1)
    toks = np.where(valid, rows, self.pad_id).astype(np.int32)
    out = {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
           'mask': valid[:, 1:].astype(np.float32)}
    if self.document_masking:
      out['segment_ids'], out['positions'] = document_layout(
          out['inputs'], valid[:, :-1], self.eos_id)
    return out


class _EncodeDocument:
  """Text -> {'tokens': ids + [EOS]} for the packer."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(text)
    return {'tokens': np.append(ids, self.tokenizer.eos_id).astype(np.int32)}


class _PackedToExample:
  """Packed rows {'tokens', 'tokens_segment_ids'} [B, L+1] -> the batch dict."""

  def __init__(self, eos_id: int, document_masking: bool):
    self.eos_id = eos_id
    self.document_masking = document_masking

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    toks = np.asarray(batch['tokens'], np.int32)
    real = np.asarray(batch['tokens_segment_ids']) > 0  # Segment 0 = packing padding.
    out = {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
           'mask': real[:, 1:].astype(np.float32)}
    if self.document_masking:
      out['segment_ids'], out['positions'] = document_layout(
          out['inputs'], real[:, :-1], self.eos_id)
    return out


class _JsonSafeIterator(grain.DatasetIterator):
  """Passes elements through; repairs a state that went through JSON on restore.

  grain 0.2.18's ConcatThenSplit iterator compares its remainder slices with the
  tuple ``(-1, -1)``; JSON (what ``grain.checkpoint`` writes) turns them into lists, so
  a restored packer would believe it holds a remainder and skip a document. Seen on
  this machine; this wrapper turns the lists back into tuples.
  """

  def __next__(self) -> Any:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    if 'remainder_slices' in state:
      state['remainder_slices'] = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state(state)


class _JsonSafe(grain.IterDataset):

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeIterator(self._parent.__iter__())


def _shuffle_seed(seed: int) -> int:
  return int(seed) % 2**32


# ------------------------------------------------------------------- the paths


def _check_size(store: token_store.SplitStore, config: ml_collections.ConfigDict,
                split: str) -> None:
  """An empty split is one clear error; a split shorter than one window, a warning."""
  what = f'the {split} split of data.source={config.data.source}' + (
      f" ('{config.data.path}')" if config.data.path else '')
  if len(store) < 2:
    raise token_store.StoreError(
        f'{what} has no text ({len(store)} tokens); add text to the corpus, lower '
        f'data.eval_fraction for a tiny eval split, or point data.path elsewhere.')
  if len(store) < config.seq_len + 1:
    key = ('short', store.directory, split, config.seq_len)
    if key not in _DESCRIBED:
      _DESCRIBED.add(key)
      _log.warning('data: %s has %d tokens, shorter than one window of seq_len+1=%d tokens: '
                   'it is one padded window (%d real targets per pass).', what, len(store),
                   config.seq_len + 1, len(store) - 1)


def _file_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  per_process: int, process_index: int, process_count: int, shuffle: bool,
                  epochs: int | None, max_tokens: int) -> grain.IterDataset:
  store = open_store(config.data, tokenizer, split)
  _check_size(store, config, split)
  limit = len(store) if max_tokens <= 0 else min(len(store), max_tokens + 1)
  global_batch = per_process * process_count
  ids = grain.MapDataset.range(_GatherWindows.count(limit, config.seq_len))
  if shuffle:
    ids = ids.shuffle(seed=_shuffle_seed(config.seed))
  if epochs != 1:
    ids = ids.repeat(epochs)  # Each epoch is shuffled with a different seed.
  # Window ids only: no data is read here. (drop_remainder when infinite: grain
  # computes ceil(len / B) in floating point, which overflows for len = sys.maxsize.)
  ds = (ids.batch(global_batch, drop_remainder=epochs is None)
        .map(_ProcessRows(process_index, per_process, global_batch, fill=-1))
        .map(_GatherWindows(store, config.seq_len, tokenizer.pad_id, limit=limit,
                            eos_id=tokenizer.eos_id,
                            document_masking=bool(config.data.document_masking))))
  # One small pread per row: threads would only contend for the GIL.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _tfds_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  per_process: int, process_index: int, process_count: int, shuffle: bool,
                  epochs: int | None, max_tokens: int) -> grain.IterDataset:
  del max_tokens  # Per-process streams: the evaluator truncates by mask (research/evaluate.py).
  texts = sources.TfdsTexts(config.data, split)
  key = ('tfds', config.data.name, texts.split_name, process_count)
  if key not in _DESCRIBED:
    _DESCRIBED.add(key)
    _log.info('data: tfds %s, named split %s: %d documents, streamed (process %d of %d '
              'tokenizes every %d-th)', config.data.name, texts.split_name, len(texts),
              process_index, process_count, process_count)
  docs = grain.MapDataset.source(texts)
  if shuffle:
    docs = docs.shuffle(seed=_shuffle_seed(config.seed))
  if epochs != 1:
    docs = docs.repeat(epochs)
  if process_count > 1:  # Each process reads and tokenizes only its documents.
    docs = docs[process_index::process_count]
  docs = docs.map(_EncodeDocument(tokenizer))
  # A couple of threads read and tokenize ahead (grain keeps their order).
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': config.seq_len + 1})
  ds = _JsonSafe(ds)
  if shuffle:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=TFDS_WINDOW_SHUFFLE, seed=_shuffle_seed(config.seed))
  ds = ds.batch(per_process, drop_remainder=False)
  ds = ds.map(_ProcessRows(0, per_process, per_process, fill=0))  # Pads a short last batch.
  return ds.map(_PackedToExample(tokenizer.eos_id, bool(config.data.document_masking)))


# ------------------------------------------------------------------- public API


def make_lm_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                    process_index: int = 0, process_count: int = 1,
                    batch_size_per_process: int | None = None, shuffle: bool = True,
                    repeat: bool = True, num_epochs: int | None = None,
                    max_tokens: int = 0) -> grain.IterDataset:
  """This process's batches of ``split`` ('train' or 'eval') as a grain IterDataset.

  ``batch_size_per_process`` defaults to ``config.batch_size // process_count``.
  ``repeat=False`` is one pass; ``repeat=True`` repeats ``num_epochs`` times (None:
  forever), reshuffling each epoch. ``max_tokens`` > 0 keeps the first ``max_tokens``
  targets of the split's stream (file sources and stores; use with ``shuffle=False``).
  ``config.data.num_workers > 0`` moves the work into grain worker processes (needs a
  ``__main__`` guard and parsed absl flags; on the tfds path the packing then happens per
  worker, so batches differ from num_workers=0, deterministically).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  if batch_size_per_process is None:
    if config.batch_size % process_count:
      raise ValueError(f'batch_size={config.batch_size} is not divisible by '
                       f'process_count={process_count}.')
    batch_size_per_process = config.batch_size // process_count
  if batch_size_per_process <= 0:
    raise ValueError(f'batch_size_per_process={batch_size_per_process} must be positive.')
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f'num_epochs={num_epochs} must be positive or None.')
  split = sources.resolve_split(config.data, split)
  epochs = num_epochs if repeat else 1
  make = _tfds_dataset if config.data.source == 'tfds' else _file_dataset
  ds = make(config, tokenizer, split, per_process=batch_size_per_process,
            process_index=process_index, process_count=process_count, shuffle=shuffle,
            epochs=epochs, max_tokens=int(max_tokens))
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds


def make_lm_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                     batch_size_per_process: int, process_index: int = 0,
                     process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                     num_epochs: int | None = None, max_tokens: int = 0
                     ) -> grain.DatasetIterator:
  """A checkpointable iterator over :func:`make_lm_dataset`.

  Supports ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave`` /
  ``CheckpointRestore``; a restored iterator yields exactly the batches the original
  would have yielded next. On the file/store path the state is global (the same on
  every process; ``global_state`` is True), so it restores under any process count.
  """
  it = iter(make_lm_dataset(
      config, tokenizer, split, process_index=process_index, process_count=process_count,
      batch_size_per_process=batch_size_per_process, shuffle=shuffle, repeat=repeat,
      num_epochs=num_epochs, max_tokens=max_tokens))
  if config.data.source == 'tfds':
    return it
  return GlobalStateIterator(it)
