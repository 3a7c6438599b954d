"""Where text comes from: the Python standard library, local text files, or TFDS.

* ``stdlib`` (the offline default): every ``*.py`` file of the running Python's
  standard library, without test directories and ``site-packages``.
* ``text_files``: the files matched by the glob ``data.path`` (``**`` recurses).
* ``tfds``: any TFDS dataset by ``data.name``, read with ``tfds.data_source``
  (random access over array_record files; TensorFlow is not needed).

File sources are split into train/eval by a hash of each file's path relative to the
corpus root, so the split is the same on every machine and never moves a file when
others are added. Everything here is cheap enough to run in a validation step: file
listings are cached and nothing is read until a pipeline asks for the documents.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from research.config import ConfigError

SOURCES = ('stdlib', 'text_files', 'tfds')
SPLITS = ('train', 'eval')
# Directory names never read from the standard library.
_STDLIB_EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages',
                                   'dist-packages', '__pycache__'})


# ------------------------------------------------------------------------ splits


def resolve_split(data_cfg: ml_collections.ConfigDict, split: str) -> str:
  """'train' or 'eval' for ``split`` (also accepts the configured TFDS split names)."""
  if split in ('train', data_cfg.train_split):
    return 'train'
  if split in ('eval', 'validation', data_cfg.eval_split):
    return 'eval'
  raise ValueError(f'split must be one of {SPLITS}, got {split!r}.')


def path_in_eval(rel_path: str, eval_fraction: float) -> bool:
  """Deterministic held-out test: the first 8 bytes of sha1(path) as a fraction."""
  h = int.from_bytes(hashlib.sha1(rel_path.encode('utf-8')).digest()[:8], 'big')
  return h / 2.0**64 < eval_fraction


def _hash_order(rel_path: str) -> str:
  return hashlib.sha1(rel_path.encode('utf-8')).hexdigest()


# ------------------------------------------------------------------ file sources


@dataclasses.dataclass(frozen=True)
class FileCorpus:
  """The files of a file source and how they are split.

  ``mode`` is ``'files'`` (whole files held out by path hash) or, when the glob
  matches too few files for that to leave both splits non-empty, ``'tail'``: every
  file contributes its last ``eval_fraction`` of lines to eval and the rest to train.
  """

  root: str
  rel_paths: tuple[str, ...]  # Sorted.
  eval_fraction: float
  mode: str

  def split_paths(self, split: str) -> list[str]:
    """Relative paths of ``split`` in hash order (a fixed pseudo-random order, so a
    prefix of the eval split samples the whole corpus, not its alphabetical start)."""
    if self.mode == 'tail':
      rel = list(self.rel_paths)
    else:
      want_eval = split == 'eval'
      rel = [r for r in self.rel_paths if path_in_eval(r, self.eval_fraction) == want_eval]
    return sorted(rel, key=_hash_order)

  @property
  def fingerprint(self) -> str:
    return hashlib.sha1('\n'.join(self.rel_paths).encode('utf-8')).hexdigest()


def _list_stdlib() -> tuple[str, tuple[str, ...]]:
  root = sysconfig.get_paths()['stdlib']
  rel = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place keeps os.walk out of site-packages (which may be huge).
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
    for f in filenames:
      if f.endswith('.py'):
        rel.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, '/'))
  return root, tuple(sorted(rel))


def _glob_root(pattern: str) -> str:
  """The directory part of ``pattern`` before its first wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for p in parts[:-1]:
    if glob.has_magic(p):
      break
    fixed.append(p)
  root = os.sep.join(fixed)
  return root or (os.sep if pattern.startswith(os.sep) else '.')


def _list_glob(pattern: str) -> tuple[str, tuple[str, ...]]:
  pattern = os.path.expanduser(pattern)
  root = _glob_root(pattern)
  paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  rel = sorted(os.path.relpath(p, root).replace(os.sep, '/') for p in paths)
  return os.path.abspath(root), tuple(rel)


@functools.lru_cache(maxsize=16)
def _file_corpus(source: str, path: str, eval_fraction: float) -> FileCorpus:
  root, rel = _list_stdlib() if source == 'stdlib' else _list_glob(path)
  n_eval = sum(path_in_eval(r, eval_fraction) for r in rel)
  mode = 'files' if 0 < n_eval < len(rel) else 'tail'
  return FileCorpus(root=root, rel_paths=rel, eval_fraction=eval_fraction, mode=mode)


def file_corpus(data_cfg: ml_collections.ConfigDict) -> FileCorpus:
  """The (cached) listing of a ``stdlib`` or ``text_files`` source; errors if empty."""
  _check_eval_fraction(data_cfg)
  if data_cfg.source == 'text_files':
    if not data_cfg.path:
      raise ConfigError("data.path is empty but data.source='text_files' needs a glob; "
                        "set e.g. data.path='~/corpus/**/*.txt'.")
  corpus = _file_corpus(data_cfg.source, data_cfg.path if data_cfg.source == 'text_files'
                        else '', float(data_cfg.eval_fraction))
  if not corpus.rel_paths:
    if data_cfg.source == 'text_files':
      raise ConfigError(
          f"data.path: glob '{data_cfg.path}' matched no files; fix the pattern (use "
          f"'dir/**/*.txt' to recurse) or use data.source=stdlib.")
    raise ConfigError(f'data.source=stdlib: no *.py files under {corpus.root}; '
                      f'use data.source=text_files.')
  return corpus


def _read(path: str) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def _tail_cut(text: str, eval_fraction: float) -> int:
  """Where the eval tail of ``text`` starts: a line start near (1 - f) * len."""
  cut = int(len(text) * (1.0 - eval_fraction))
  nl = text.find('\n', cut)
  return nl + 1 if 0 <= nl < len(text) - 1 else cut


def file_documents(data_cfg: ml_collections.ConfigDict, split: str) -> Iterator[str]:
  """The documents of a file source's ``split``, read lazily one file at a time."""
  split = resolve_split(data_cfg, split)
  corpus = file_corpus(data_cfg)
  for rel in corpus.split_paths(split):
    text = _read(os.path.join(corpus.root, rel))
    if corpus.mode == 'tail':
      cut = _tail_cut(text, corpus.eval_fraction)
      text = text[:cut] if split == 'train' else text[cut:]
    yield text


# ------------------------------------------------------------------------- TFDS


def tfds_split_name(data_cfg: ml_collections.ConfigDict, split: str) -> str:
  return data_cfg.train_split if resolve_split(data_cfg, split) == 'train' else data_cfg.eval_split


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _not_prepared(name: str, data_dir: str, detail: str) -> ConfigError:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return ConfigError(
      f"data.name: TFDS dataset '{name}' is not prepared in {where} ({detail}); the network "
      f"is needed to download '{name}' (on a machine with it: tfds build {name} "
      f"--file_format=array_record), or prepare it elsewhere and point data.tfds_data_dir "
      f"at it, or use data.source=stdlib / text_files offline.")


def _open_tfds(name: str, split: str, data_dir: str) -> Any:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ConfigError(f'data.source=tfds needs tensorflow-datasets ({_first_line(e)}); '
                      f'pip install tensorflow-datasets.') from None
  try:
    # download=False: never touch the network here (without it, tfds would try to
    # download and hang or fail slowly offline); "not prepared" is detected instead.
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"data.name: TFDS has no dataset named '{name}'; check the spelling "
                      f"(e.g. 'tiny_shakespeare', 'lm1b', 'c4/en').") from None
  except (KeyError, AssertionError, FileNotFoundError):
    raise _not_prepared(name, data_dir, 'no prepared files found') from None
  except NotImplementedError as e:
    # With an explicit data_dir tfds assumes tfrecord when nothing is there yet.
    if not _is_prepared(tfds, name, data_dir):
      raise _not_prepared(name, data_dir, 'no prepared files found') from None
    raise ConfigError(  # Prepared, but in a format without random access.
        f"data.name: TFDS dataset '{name}' is not in a random-access format "
        f"({_first_line(e)}); prepare it with --file_format=array_record.") from None
  except ImportError as e:  # A builder whose code needs TensorFlow or another module.
    raise ConfigError(f"data.name: loading TFDS dataset '{name}' needs a missing module "
                      f"({_first_line(e)}); install it or use another data.source.") from None
  except ValueError as e:
    if 'split' in str(e).lower():
      raise ConfigError(
          f"data.train_split/data.eval_split: '{split}' is not a split of TFDS dataset "
          f"'{name}' ({_first_line(e)}).") from None
    raise


def _is_prepared(tfds: Any, name: str, data_dir: str) -> bool:
  try:
    return bool(tfds.builder(name, data_dir=data_dir or None).is_prepared())
  except Exception:  # pylint: disable=broad-except
    return False


def _as_text(value: Any) -> str:
  if hasattr(value, 'item') and getattr(value, 'shape', None) == ():
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return str(value)


class TfdsTexts(Sequence):
  """Random access to one text feature of a TFDS split. Pickles (for grain workers)."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str):
    self.name = data_cfg.name
    self.split_name = tfds_split_name(data_cfg, split)
    self.text_key = data_cfg.text_key
    self._source = open_tfds(data_cfg, split)
    if len(self._source):
      example = self._source[0]
      if self.text_key not in example:
        raise ConfigError(
            f"data.text_key='{self.text_key}' is not a feature of TFDS dataset "
            f"'{self.name}'; it has {sorted(example)}.")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:  # type: ignore[override]
    return _as_text(self._source[index][self.text_key])


def open_tfds(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
  """``tfds.data_source`` for ``split`` ('train'/'eval'), with one-line offline errors."""
  if not data_cfg.name:
    raise ConfigError("data.name is empty but data.source='tfds' needs a dataset name, "
                      "e.g. data.name=tiny_shakespeare.")
  return _open_tfds(data_cfg.name, tfds_split_name(data_cfg, split), data_cfg.tfds_data_dir)


# ------------------------------------------------------------------- public API


def _check_source(data_cfg: ml_collections.ConfigDict) -> None:
  if data_cfg.source not in SOURCES:
    raise ConfigError(f'data.source={data_cfg.source!r} is unknown; allowed: {list(SOURCES)}.')


def _check_eval_fraction(data_cfg: ml_collections.ConfigDict) -> None:
  if not 0.0 < float(data_cfg.eval_fraction) < 1.0:
    raise ConfigError(f'data.eval_fraction={data_cfg.eval_fraction} must be in (0, 1).')


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Fails fast (before anything is compiled) on a data config that cannot work.

  Cheap: lists files (cached) or opens TFDS metadata; reads no document.
  """
  _check_source(data_cfg)
  from research.data.tokenizers import SPM_MIN_VOCAB, TOKENIZERS  # Avoids an import cycle.
  if data_cfg.tokenizer not in TOKENIZERS:
    raise ConfigError(f'data.tokenizer={data_cfg.tokenizer!r} is unknown; '
                      f'allowed: {list(TOKENIZERS)}.')
  if data_cfg.tokenizer == 'sentencepiece' and data_cfg.spm_vocab_size < SPM_MIN_VOCAB:
    raise ConfigError(f'data.spm_vocab_size={data_cfg.spm_vocab_size} is too small: byte '
                      f'fallback needs 256 byte pieces plus 4 special ids; use at least '
                      f'{SPM_MIN_VOCAB}.')
  if data_cfg.num_workers < 0:
    raise ConfigError(f'data.num_workers={data_cfg.num_workers} must be >= 0.')
  if data_cfg.source == 'tfds':
    for split in SPLITS:
      TfdsTexts(data_cfg, split)
  else:
    file_corpus(data_cfg)


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[str] | Iterator[str]:
  """The texts of ``split``: random access for TFDS, a lazy iterator for files."""
  _check_source(data_cfg)
  if data_cfg.source == 'tfds':
    return TfdsTexts(data_cfg, split)
  return file_documents(data_cfg, split)


def training_texts(data_cfg: ml_collections.ConfigDict) -> Iterator[str]:
  """Train-split texts in a fixed order, lazily (to train a tokenizer on a prefix)."""
  yield from documents(data_cfg, 'train')


def corpus_info(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the run reads, for its config.json: sizes per split and a fingerprint."""
  _check_source(data_cfg)
  info: dict[str, Any] = {'source': data_cfg.source}
  if data_cfg.source == 'tfds':
    info.update(name=data_cfg.name, tfds_data_dir=data_cfg.tfds_data_dir,
                text_key=data_cfg.text_key)
    for split in SPLITS:
      info[f'{split}_split'] = tfds_split_name(data_cfg, split)
      info[f'{split}_examples'] = len(open_tfds(data_cfg, split))
    return info
  corpus = file_corpus(data_cfg)
  info.update(
      python_version=platform.python_version(),
      python_implementation=platform.python_implementation(),
      root=corpus.root, split_mode=corpus.mode, eval_fraction=corpus.eval_fraction,
      num_files=len(corpus.rel_paths), fingerprint=corpus.fingerprint,
      total_bytes=sum(os.path.getsize(os.path.join(corpus.root, r)) for r in corpus.rel_paths))
  if data_cfg.source == 'text_files':
    info['path'] = data_cfg.path
  for split in SPLITS:
    paths = corpus.split_paths(split)
    info[f'{split}_files'] = len(paths)
    if corpus.mode == 'files':
      info[f'{split}_bytes'] = sum(os.path.getsize(os.path.join(corpus.root, r)) for r in paths)
  return info
