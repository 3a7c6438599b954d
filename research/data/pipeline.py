"""The LM input pipeline on grain: packed windows, shuffled by seed, sharded by process.

Every batch is a dict of numpy arrays for one process:
  ``inputs`` [B, L] int32, ``targets`` [B, L] int32 (inputs shifted by one) and
  ``mask`` [B, L] float32 (1.0 where the target is a real token, 0.0 on padding),
with B = batch_size_per_process and L = config.seq_len.

Packing is GPT-style concat-and-chunk: documents are tokenized, each followed by EOS,
concatenated and cut into windows of L+1 tokens. Two paths:

* File sources (``stdlib``, ``text_files``) are tokenized once per process into one
  array (cached), and window ``w`` is ``tokens[w*L : w*L + L + 1]`` (consecutive windows
  share one token, so every token is a target exactly once). The window order is a
  stateless permutation (``MapDataset.shuffle``, re-seeded each epoch), so the state
  of an iterator is a single position.
* ``tfds`` streams: documents (shuffled by index) are tokenized lazily and packed by
  grain's ``ConcatThenSplitIterDataset`` into non-overlapping windows of L+1 tokens, then
  mixed by a window shuffle buffer, so a dataset of any size (c4) or a single huge
  document (tiny_shakespeare) never has to be tokenized up front.

Processes: both paths first form the *global* batch of ``B * process_count`` windows and
process ``p`` keeps rows ``[p*B, (p+1)*B)``. So the concatenation of all processes'
batches, in process order, is exactly the batch a single process would see with the
same seed. On the file path a process reads only its own windows; on the tfds path
each process packs the whole stream (packing is sequential) and keeps its rows.

Without ``repeat`` the last global batch is completed with all-padding rows (mask 0),
so every batch has a static shape and no data is dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grain
import ml_collections
import numpy as np

from research.data import sources
from research.data.tokenizers import Tokenizer

# tfds path: windows mixed by the shuffle buffer after packing (a restore replays at
# most this many windows). Matters for datasets with few, long documents.
TFDS_WINDOW_SHUFFLE = 1024

_STREAMS: dict[tuple, np.ndarray] = {}


# ---------------------------------------------------------------- token streams


def _stream_key(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str) -> tuple:
  path = data_cfg.path if data_cfg.source == 'text_files' else ''
  return (data_cfg.source, path, float(data_cfg.eval_fraction), split, tokenizer.fingerprint)


def token_stream(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 split: str) -> np.ndarray:
  """A file split as one token array, documents each followed by EOS (cached).

  Stored as uint16 when the vocabulary fits (halves memory, also in grain workers).
  """
  split = sources.resolve_split(data_cfg, split)
  key = _stream_key(data_cfg, tokenizer, split)
  if key not in _STREAMS:
    t0 = time.perf_counter()
    texts = list(sources.file_documents(data_cfg, split))
    encode_docs = getattr(tokenizer, 'encode_documents', None)
    if encode_docs is not None:
      tokens = encode_docs(texts)
    else:
      eos = np.array([tokenizer.eos_id], np.int32)
      tokens = np.concatenate([x for t in tokenizer.encode_batch(texts) for x in (t, eos)])
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    _STREAMS[key] = np.ascontiguousarray(tokens, dtype=dtype)
    logging.info('Tokenized %s/%s: %d documents -> %d tokens in %.2fs', data_cfg.source,
                 split, len(texts), len(tokens), time.perf_counter() - t0)
  return _STREAMS[key]


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats/token of the token frequencies (the loss of a unigram model)."""
  counts = np.bincount(np.asarray(tokens, np.int64))
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


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
  """Window ids [B] (-1 = padding row) -> the batch dict, by one fancy-index gather."""

  def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int):
    self.tokens = tokens
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.offsets = np.arange(seq_len + 1, dtype=np.int64)

  @staticmethod
  def count(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len+1 tokens at stride seq_len covering every target once."""
    return max(1, -(-(num_tokens - 1) // seq_len))

  def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    idx = np.maximum(ids, 0)[:, None] * self.seq_len + self.offsets[None, :]
    valid = (idx < len(self.tokens)) & (ids >= 0)[:, None]
    toks = np.where(valid, self.tokens[np.minimum(idx, len(self.tokens) - 1)], self.pad_id)
    toks = toks.astype(np.int32)
    return {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
            'mask': valid[:, 1:].astype(np.float32)}


class _EncodeDocument:
  """Text -> {'tokens': ids + [EOS]} for the packer."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = self.tokenizer.encode(text)
    return {'tokens': np.append(ids, self.tokenizer.eos_id).astype(np.int32)}


class _PackedToExample:
  """Packed rows {'tokens', 'tokens_segment_ids'} [B, L+1] -> the batch dict."""

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    toks = np.asarray(batch['tokens'], np.int32)
    real = np.asarray(batch['tokens_segment_ids']) > 0  # Segment 0 = packing padding.
    return {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
            'mask': real[:, 1:].astype(np.float32)}


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


def _file_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  per_process: int, process_index: int, process_count: int, shuffle: bool,
                  epochs: int | None) -> grain.IterDataset:
  tokens = token_stream(config.data, tokenizer, split)
  if len(tokens) < 2:
    raise ValueError(f'the {split} split of data.source={config.data.source} has no text.')
  global_batch = per_process * process_count
  ids = grain.MapDataset.range(_GatherWindows.count(len(tokens), config.seq_len))
  if shuffle:
    ids = ids.shuffle(seed=_shuffle_seed(config.seed))
  if epochs != 1:
    ids = ids.repeat(epochs)  # Each epoch is shuffled with a different seed.
  # Window ids only: no data is read here. (drop_remainder when infinite: grain
  # computes ceil(len / B) in floating point, which overflows for len = sys.maxsize.)
  ds = (ids.batch(global_batch, drop_remainder=epochs is None)
        .map(_ProcessRows(process_index, per_process, global_batch, fill=-1))
        .map(_GatherWindows(tokens, config.seq_len, tokenizer.pad_id)))
  # In-memory data: threads would only contend for the GIL.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _tfds_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  per_process: int, process_index: int, process_count: int, shuffle: bool,
                  epochs: int | None) -> grain.IterDataset:
  docs = grain.MapDataset.source(sources.TfdsTexts(config.data, split))
  if shuffle:
    docs = docs.shuffle(seed=_shuffle_seed(config.seed))
  if epochs != 1:
    docs = docs.repeat(epochs)
  docs = docs.map(_EncodeDocument(tokenizer))
  # A couple of threads read and tokenize ahead (grain keeps their order).
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': config.seq_len + 1})
  ds = _JsonSafe(ds)
  if shuffle:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=TFDS_WINDOW_SHUFFLE, seed=_shuffle_seed(config.seed))
  global_batch = per_process * process_count
  ds = ds.batch(global_batch, drop_remainder=False)
  ds = ds.map(_ProcessRows(process_index, per_process, global_batch, fill=0))
  return ds.map(_PackedToExample())


# ------------------------------------------------------------------- public API


def make_lm_dataset(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                    process_index: int = 0, process_count: int = 1,
                    batch_size_per_process: int | None = None, shuffle: bool = True,
                    repeat: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  """This process's batches of ``split`` ('train' or 'eval') as a grain IterDataset.

  ``batch_size_per_process`` defaults to ``config.batch_size // process_count``.
  ``repeat=False`` is one pass; ``repeat=True`` repeats ``num_epochs`` times (None:
  forever), reshuffling each epoch. ``config.data.num_workers > 0`` moves the work
  into grain worker processes (needs a ``__main__`` guard and parsed absl flags; on
  the tfds path the packing then happens per worker, so batches differ from
  num_workers=0, deterministically).
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
            epochs=epochs)
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds


def make_lm_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                     batch_size_per_process: int, process_index: int = 0,
                     process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                     num_epochs: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over :func:`make_lm_dataset`.

  Supports ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave`` /
  ``CheckpointRestore``; a restored iterator yields exactly the batches the original
  would have yielded next.
  """
  return iter(make_lm_dataset(
      config, tokenizer, split, process_index=process_index, process_count=process_count,
      batch_size_per_process=batch_size_per_process, shuffle=shuffle, repeat=repeat,
      num_epochs=num_epochs))
