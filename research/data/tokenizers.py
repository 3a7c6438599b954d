"""Tokenizers: raw UTF-8 bytes, or a SentencePiece model trained on the corpus.

Both share one small interface (:class:`Tokenizer`) and the same special ids
(pad=0, bos=1, eos=2), so the pipeline and the model never care which one is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import ml_collections
import numpy as np

from research.config import ConfigError

TOKENIZERS = ('bytes', 'sentencepiece')
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# SentencePiece with byte_fallback needs 256 byte pieces plus the 4 special ones (and
# in practice one piece per distinct character seen: about 350 in all for code).
SPM_MIN_VOCAB = 256 + 4 + 1
# Training "sentences" are chunks of documents cut at line ends: keeping newlines
# inside them lets pieces like ")\n" form, which matters for code.
_SPM_CHUNK_CHARS = 4096


class Tokenizer(Protocol):
  """What the pipeline and the trainer rely on."""

  pad_id: int
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int: ...

  @property
  def fingerprint(self) -> str:
    """Identifies the exact vocabulary (used as a cache key)."""
    ...

  def encode(self, text: str) -> np.ndarray: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past the special ids: byte b -> id b + 3."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  offset = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.offset

  @property
  def fingerprint(self) -> str:
    return 'bytes-v1'

  def encode(self, text: str) -> np.ndarray:
    data = text.encode('utf-8', errors='replace')
    return np.frombuffer(data, np.uint8).astype(np.int32) + self.offset

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
    """All ``texts`` as one array, each followed by EOS (fast path: one conversion)."""
    blobs = [t.encode('utf-8', errors='replace') for t in texts]
    ids = np.frombuffer(b''.join(blobs), np.uint8).astype(np.int32) + self.offset
    ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    return np.insert(ids, ends, self.eos_id).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    arr = _id_array(ids)
    arr = arr[(arr >= self.offset) & (arr < self.vocab_size)] - self.offset
    return arr.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model (byte fallback, so no text is ever unknown).

  Pickles as its serialized model, so grain worker processes can use it.
  """

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
      raise ValueError(f'SentencePiece model has special ids (pad, bos, eos, unk)={ids}; '
                       f'expected {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}.')
    self._special = np.array([PAD_ID, BOS_ID, EOS_ID])

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    with open(path, 'rb') as f:
      return cls(f.read())

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int, max_chars: int,
            num_threads: int | None = None) -> SentencePieceTokenizer:
    """Trains on at most ``max_chars`` characters of ``texts`` (unigram model).

    Normalization is off and whitespace is kept verbatim (code is
    whitespace-sensitive), so ``decode(encode(s)) == s`` for any string.
    """
    import sentencepiece as spm
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_training_chunks(texts, max_chars),
          model_writer=model,
          vocab_size=vocab_size,
          model_type='unigram',
          byte_fallback=True,
          pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
          normalization_rule_name='identity',
          remove_extra_whitespaces=False,
          add_dummy_prefix=False,
          allow_whitespace_only_pieces=True,
          split_digits=True,
          max_sentence_length=4 * _SPM_CHUNK_CHARS + 16,
          shuffle_input_sentence=False,  # Deterministic given the same input.
          num_threads=num_threads or min(os.cpu_count() or 1, 16),
          minloglevel=2,
      )
    except RuntimeError as e:
      msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      msg = msg.split('] ', 1)[-1][:200]  # Drop sentencepiece's source location.
      if 'smaller than required_chars' in msg:  # 256 bytes + specials + every char seen.
        raise ConfigError(
            f'data.spm_vocab_size={vocab_size} is too small for the characters of the '
            f'training text (sentencepiece: {msg}); raise it.') from None
      if 'Vocabulary size' in msg or 'vocab_size' in msg:
        raise ConfigError(
            f'data.spm_vocab_size={vocab_size} is too large for the training text '
            f'(sentencepiece: {msg}); lower it or raise data.spm_train_chars.') from None
      raise
    return cls(model.getvalue())

  def save(self, path: str) -> None:
    """Writes atomically, so concurrent processes never see a partial file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
      f.write(self._proto)
    os.replace(tmp, path)

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def fingerprint(self) -> str:
    return 'spm-' + hashlib.sha1(self._proto).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    out = self._sp.encode(list(texts), num_threads=min(os.cpu_count() or 1, 16))
    return [np.asarray(x, np.int32) for x in out]

  def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
    """All ``texts`` as one array, each followed by EOS."""
    parts = []
    for ids in self.encode_batch(texts):
      parts.append(ids)
      parts.append(np.array([self.eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    arr = _id_array(ids)
    arr = arr[~np.isin(arr, self._special) & (arr >= 0) & (arr < self.vocab_size)]
    return self._sp.decode(arr.tolist())

  def __getstate__(self) -> dict:
    return {'proto': self._proto}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['proto'])


def _id_array(ids: Iterable[int] | np.ndarray) -> np.ndarray:
  """Any ids (list, numpy or jax array, generator) as a flat int64 array."""
  if not hasattr(ids, '__len__'):
    ids = list(ids)
  return np.asarray(ids, np.int64).reshape(-1)


def _training_chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Yields pieces of ``texts`` (cut at line ends) until ``max_chars`` are given."""
  left = max_chars
  for text in texts:
    pos = 0
    while pos < len(text) and left > 0:
      end = min(pos + _SPM_CHUNK_CHARS, len(text), pos + left)
      if end < len(text):
        nl = text.rfind('\n', pos, end)
        end = nl + 1 if nl > pos else end
      chunk = text[pos:end]
      left -= len(chunk)
      pos = end
      if chunk:
        yield chunk
    if left <= 0:
      return


def spm_model_path(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer', 'spm.model')


def make_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str | None) -> Tokenizer:
  """The tokenizer named by ``data.tokenizer``.

  SentencePiece is trained once per workdir on the training split and saved to
  ``<workdir>/tokenizer/spm.model``; a resumed run loads that file instead, so its
  vocabulary never changes under a checkpoint. Without a workdir it trains into a
  temporary directory.
  """
  name = data_cfg.tokenizer
  if name == 'bytes':
    return ByteTokenizer()
  if name != 'sentencepiece':
    raise ConfigError(
        f'data.tokenizer={name!r} is unknown; allowed: {list(TOKENIZERS)}.')
  vocab = int(data_cfg.spm_vocab_size)
  if vocab < SPM_MIN_VOCAB:
    raise ConfigError(
        f'data.spm_vocab_size={vocab} is too small: byte fallback needs 256 byte pieces '
        f'plus 4 special ids; use at least {SPM_MIN_VOCAB}.')
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix='spm_')
  path = spm_model_path(workdir)
  if os.path.exists(path):
    tok = SentencePieceTokenizer.load(path)
    if tok.vocab_size != vocab:
      raise ConfigError(
          f'data.spm_vocab_size={vocab} but the tokenizer saved in {path} has '
          f'{tok.vocab_size} pieces; use a fresh --workdir or the vocab size it was trained with.')
    return tok
  if data_cfg.source == 'tokens':  # A store made with SentencePiece carries its model.
    stored = os.path.join(os.path.expanduser(data_cfg.path), 'tokenizer', 'spm.model')
    if not os.path.exists(stored):
      raise ConfigError(f'data.tokenizer=sentencepiece but the store data.path={data_cfg.path!r} '
                        f'has no tokenizer/spm.model; set data.tokenizer to the store\'s tokenizer.')
    tok = SentencePieceTokenizer.load(stored)
    tok.save(path)
    return tok
  from research.data import sources  # Late: sources is only needed to train.
  logging.info('Training a %d-piece SentencePiece model on <= %d chars of %s',
               vocab, data_cfg.spm_train_chars, data_cfg.source)
  tok = SentencePieceTokenizer.train(
      sources.training_texts(data_cfg), vocab_size=vocab,
      max_chars=int(data_cfg.spm_train_chars))
  if os.path.exists(path):  # Another process finished first: everyone uses its model.
    return SentencePieceTokenizer.load(path)
  tok.save(path)
  return tok


def declared_vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  """The vocabulary ``data.*`` declares, without training a tokenizer (AOT planning)."""
  if data_cfg.tokenizer == 'sentencepiece':
    return int(data_cfg.spm_vocab_size)
  return ByteTokenizer().vocab_size
