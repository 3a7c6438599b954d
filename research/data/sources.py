"""Where text comes from: the Python standard library, local files, TFDS, or a token store.

* ``stdlib`` (the offline default): every ``*.py`` file of the running Python's
  standard library, without test directories and ``site-packages``.
* ``text_files``: the files matched by the glob ``data.path`` (``**`` recurses); one
  document per file.
* ``jsonl`` / ``parquet``: the files matched by ``data.path``, one document per record
  (line / row) taken from the string field ``data.text_key`` (what researchers download).
* ``tfds``: any TFDS dataset by ``data.name``, read with ``tfds.data_source``
  (random access over array_record files; TensorFlow is not needed).
* ``tokens``: a store prepared by ``python -m launch.prepare_data`` (research/data/token_store.py).

Bad input never ends in a traceback: binary files (NUL bytes) are skipped, invalid UTF-8
is replaced and counted, records without the text field are skipped and counted; the
counts (:class:`ReadStats`) are logged as warnings naming the first offending file.

File sources are split into train/eval by a hash of each file's path relative to the
corpus root, so the split is the same on every machine and never moves a file when
others are added. Everything here is cheap enough to run in a validation step: file
listings are cached and nothing is read until a pipeline asks for the documents.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from research.config import ConfigError

_log = logging.getLogger(__name__)

SOURCES = ('stdlib', 'text_files', 'jsonl', 'parquet', 'tfds', 'tokens')
# Sources read from files matched by a glob (data.path) or the stdlib listing.
FILE_SOURCES = ('stdlib', 'text_files', 'jsonl', 'parquet')
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


_EXAMPLE_GLOB = {'text_files': '~/corpus/**/*.txt', 'jsonl': '~/corpus/*.jsonl',
                 'parquet': '~/corpus/*.parquet'}


def file_corpus(data_cfg: ml_collections.ConfigDict) -> FileCorpus:
  """The (cached) listing of a file source (stdlib, text_files, jsonl, parquet); errors if empty."""
  _check_eval_fraction(data_cfg)
  globbed = data_cfg.source != 'stdlib'
  if globbed and not data_cfg.path:
    raise ConfigError(f"data.path is empty but data.source='{data_cfg.source}' needs a glob; "
                      f"set e.g. data.path='{_EXAMPLE_GLOB[data_cfg.source]}'.")
  corpus = _file_corpus(data_cfg.source, data_cfg.path if globbed else '',
                        float(data_cfg.eval_fraction))
  if not corpus.rel_paths:
    if globbed:
      raise ConfigError(
          f"data.path: glob '{data_cfg.path}' matched no files; fix the pattern (use "
          f"'dir/**/*.txt' to recurse) or use data.source=stdlib.")
    raise ConfigError(f'data.source=stdlib: no *.py files under {corpus.root}; '
                      f'use data.source=text_files.')
  return corpus


# ------------------------------------------------------------ reading, with stats


@dataclasses.dataclass
class ReadStats:
  """What reading found wrong: counts and the first offending file of each kind."""

  files: int = 0
  empty_files: int = 0
  first_empty: str = ''
  binary_files: int = 0
  first_binary: str = ''
  replaced_bytes: int = 0
  first_replaced: str = ''
  bad_records: int = 0
  first_bad_record: str = ''

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def merge(self, other: ReadStats) -> None:
    for f in dataclasses.fields(self):
      a, b = getattr(self, f.name), getattr(other, f.name)
      setattr(self, f.name, (a or b) if isinstance(a, str) else a + b)

  def note(self, kind: str, where: str, count: int = 1) -> None:
    first = {'empty_files': 'first_empty', 'binary_files': 'first_binary',
             'replaced_bytes': 'first_replaced', 'bad_records': 'first_bad_record'}[kind]
    setattr(self, kind, getattr(self, kind) + count)
    if not getattr(self, first):
      setattr(self, first, where)

  def warnings(self, source: str, text_key: str = 'text') -> list[str]:
    out = []
    if self.empty_files and source != 'stdlib':  # Empty __init__.py files are normal there.
      out.append(f'data: {self.empty_files} empty file(s) contribute no text '
                 f'(first: {self.first_empty}).')
    if self.binary_files:
      out.append(f'data: skipped {self.binary_files} binary file(s) (NUL bytes; first: '
                 f'{self.first_binary}).')
    if self.replaced_bytes:
      out.append(f'data: invalid UTF-8: {self.replaced_bytes} byte(s) replaced by U+FFFD '
                 f'(first in {self.first_replaced}).')
    if self.bad_records:
      out.append(f'data: skipped {self.bad_records} record(s) that are not valid JSON or have '
                 f'no string field {text_key!r} (first: {self.first_bad_record}).')
    return out

  def log_warnings(self, data_cfg: ml_collections.ConfigDict) -> None:
    for w in self.warnings(data_cfg.source, data_cfg.text_key):
      _log.warning(w)


class _CountingReplace:
  """A codecs error handler like 'replace' that counts the bytes it replaced."""

  def __init__(self):
    self.count = 0

  def __call__(self, e: UnicodeDecodeError) -> tuple[str, int]:
    self.count += e.end - e.start
    return '\ufffd', e.end


_REPLACE = _CountingReplace()
codecs.register_error('research_count_replace', _REPLACE)


def decode(data: bytes, where: str, stats: ReadStats) -> str:
  """UTF-8 text of ``data``; invalid bytes become U+FFFD and are counted in ``stats``."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    before = _REPLACE.count
    text = data.decode('utf-8', errors='research_count_replace')
    stats.note('replaced_bytes', where, _REPLACE.count - before)
    return text


def read_text_file(path: str, where: str, stats: ReadStats) -> str | None:
  """A text file's content; None (counted) for a binary file (NUL in its first 8 KB)."""
  with open(path, 'rb') as f:
    data = f.read()
  stats.files += 1
  if not data:
    stats.note('empty_files', where)
  elif b'\x00' in data[:8192]:
    stats.note('binary_files', where)
    return None
  # Universal newlines, as text-mode open() reads them (the token stream stays the same).
  return decode(data, where, stats).replace('\r\n', '\n').replace('\r', '\n')


def _tail_cut(text: str, eval_fraction: float) -> int:
  """Where the eval tail of ``text`` starts: a line start near (1 - f) * len."""
  cut = int(len(text) * (1.0 - eval_fraction))
  nl = text.find('\n', cut)
  return nl + 1 if 0 <= nl < len(text) - 1 else cut


@dataclasses.dataclass(frozen=True)
class Item:
  """A unit of reading: a whole file, the head/tail of a file (text tail split), a byte
  range of a JSONL file or a row range of a Parquet file. ``size`` is in bytes (approx.)."""

  rel: str
  part: str  # 'all' | 'head' | 'tail' | 'bytes' | 'rows'
  start: int = 0
  end: int = 0
  size: int = 0


# JSONL files and Parquet row groups are cut into items of about this many bytes, so one
# big file is still prepared by several workers.
_ITEM_BYTES = 32 << 20


def _line_start(f: Any, pos: int) -> int:
  """The first line start at or after byte ``pos`` of the open binary file ``f``."""
  if pos <= 0:
    return 0
  f.seek(pos - 1)
  f.readline()
  return f.tell()


def _jsonl_items(root: str, rel: str, mode: str, split: str, eval_fraction: float) -> list[Item]:
  path = os.path.join(root, rel)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    lo, hi = 0, size
    if mode == 'tail':
      cut = _line_start(f, int(size * (1.0 - eval_fraction)))
      lo, hi = (0, cut) if split == 'train' else (cut, size)
    bounds = [lo]
    while bounds[-1] < hi:
      nxt = _line_start(f, bounds[-1] + _ITEM_BYTES)
      bounds.append(min(max(nxt, bounds[-1] + 1), hi))
  if len(bounds) == 1:
    return [Item(rel, 'bytes', lo, lo, 0)]
  return [Item(rel, 'bytes', a, b, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def _parquet_items(root: str, rel: str, mode: str, split: str, eval_fraction: float
                   ) -> list[Item]:
  import pyarrow.parquet as pq
  meta = pq.ParquetFile(os.path.join(root, rel)).metadata
  rows = meta.num_rows
  lo, hi = 0, rows
  if mode == 'tail':
    cut = int(rows * (1.0 - eval_fraction))
    lo, hi = (0, cut) if split == 'train' else (cut, rows)
  bytes_per_row = os.path.getsize(os.path.join(root, rel)) / max(rows, 1)
  step = max(1, int(_ITEM_BYTES / max(bytes_per_row, 1.0)))
  items = [Item(rel, 'rows', a, min(a + step, hi), int((min(a + step, hi) - a) * bytes_per_row))
           for a in range(lo, hi, step)]
  return items or [Item(rel, 'rows', lo, lo, 0)]


_TFDS_ITEM_DOCS = 20_000  # TFDS examples per item when preparing a store from TFDS.


def split_items(data_cfg: ml_collections.ConfigDict, split: str) -> list[Item]:
  """The items of a file source's ``split``, in the order their documents are streamed."""
  split = resolve_split(data_cfg, split)
  if data_cfg.source == 'tfds':  # Index ranges of the split (size: a guess for grouping).
    n = len(open_tfds(data_cfg, split))
    return [Item(tfds_split_name(data_cfg, split), 'examples', a, min(a + _TFDS_ITEM_DOCS, n),
                 (min(a + _TFDS_ITEM_DOCS, n) - a) * 2000)
            for a in range(0, n, _TFDS_ITEM_DOCS)] or [Item('', 'examples', 0, 0, 0)]
  corpus = file_corpus(data_cfg)
  items: list[Item] = []
  for rel in corpus.split_paths(split):
    size = os.path.getsize(os.path.join(corpus.root, rel))
    if data_cfg.source == 'jsonl':
      items += _jsonl_items(corpus.root, rel, corpus.mode, split, corpus.eval_fraction)
    elif data_cfg.source == 'parquet':
      items += _parquet_items(corpus.root, rel, corpus.mode, split, corpus.eval_fraction)
    elif corpus.mode == 'tail':
      frac = (1 - corpus.eval_fraction) if split == 'train' else corpus.eval_fraction
      items.append(Item(rel, 'head' if split == 'train' else 'tail', size=int(size * frac)))
    else:
      items.append(Item(rel, 'all', size=size))
  return items


def source_spec(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a worker process needs to read items (picklable, no ConfigDict)."""
  if data_cfg.source == 'tfds':
    return {'source': 'tfds', 'name': data_cfg.name, 'data_dir': data_cfg.tfds_data_dir,
            'text_key': data_cfg.text_key}
  corpus = file_corpus(data_cfg)
  return {'source': data_cfg.source, 'root': corpus.root, 'text_key': data_cfg.text_key,
          'eval_fraction': corpus.eval_fraction}


def _record_text(value: Any, where: str, stats: ReadStats) -> str | None:
  if isinstance(value, bytes):
    return decode(value, where, stats)
  if isinstance(value, str):
    return value
  stats.note('bad_records', where)
  return None


def _jsonl_documents(spec: dict[str, Any], item: Item, stats: ReadStats) -> Iterator[str]:
  key = spec['text_key']
  with open(os.path.join(spec['root'], item.rel), 'rb') as f:
    if item.start == 0:
      stats.files += 1
      head = f.read(8192)
      if not head:
        stats.note('empty_files', item.rel)
      elif b'\x00' in head:
        stats.note('binary_files', item.rel)
        return
    f.seek(item.start)
    pos = item.start
    while pos < item.end:
      line = f.readline()
      if not line:
        break
      where = f'{item.rel} byte {pos}'
      pos += len(line)
      if not line.strip():
        continue
      try:
        record = json.loads(decode(line, where, stats))
      except ValueError:
        stats.note('bad_records', where)
        continue
      text = _record_text(record.get(key) if isinstance(record, dict) else None, where, stats)
      if text is not None:
        yield text


def _parquet_documents(spec: dict[str, Any], item: Item, stats: ReadStats) -> Iterator[str]:
  import pyarrow.parquet as pq
  pf = pq.ParquetFile(os.path.join(spec['root'], item.rel))
  if item.start == 0:
    stats.files += 1
  row0 = 0
  for g in range(pf.metadata.num_row_groups):
    n = pf.metadata.row_group(g).num_rows
    lo, hi = max(item.start, row0), min(item.end, row0 + n)
    if lo < hi:
      column = pf.read_row_group(g, columns=[spec['text_key']]).column(0)
      for i, value in enumerate(column.slice(lo - row0, hi - lo).to_pylist()):
        text = _record_text(value, f'{item.rel} row {lo + i}', stats)
        if text is not None:
          yield text
    row0 += n


def item_documents(spec: dict[str, Any], items: Sequence[Item], stats: ReadStats
                   ) -> Iterator[str]:
  """The documents of ``items`` in order, counting bad input in ``stats``."""
  for item in items:
    if spec['source'] == 'tfds':
      if item.end > item.start:
        src = _open_tfds(spec['name'], item.rel, spec['data_dir'])
        for i in range(item.start, item.end):
          yield _as_text(src[i][spec['text_key']])
    elif spec['source'] == 'jsonl':
      yield from _jsonl_documents(spec, item, stats)
    elif spec['source'] == 'parquet':
      yield from _parquet_documents(spec, item, stats)
    else:
      # A tail split reads each file twice (head for train, tail for eval): count once.
      text = read_text_file(os.path.join(spec['root'], item.rel), item.rel,
                            stats if item.part != 'tail' else ReadStats())
      if text is None:
        continue
      if item.part != 'all':
        cut = _tail_cut(text, spec['eval_fraction'])
        text = text[:cut] if item.part == 'head' else text[cut:]
      yield text


def file_documents(data_cfg: ml_collections.ConfigDict, split: str,
                   stats: ReadStats | None = None) -> Iterator[str]:
  """The documents of a file source's ``split``, read lazily one item at a time."""
  stats = stats if stats is not None else ReadStats()
  yield from item_documents(source_spec(data_cfg), split_items(data_cfg, split), stats)


def source_fingerprint(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Identifies a file source's exact input: listing, sizes, mtimes, split and text field.

  Also a token store's ``source`` record (and part of its cache key).
  """
  if data_cfg.source == 'tfds':
    return {'source': 'tfds', 'name': data_cfg.name, 'data_dir': data_cfg.tfds_data_dir,
            'text_key': data_cfg.text_key, 'split_mode': 'splits',
            **{f'{s}_split': tfds_split_name(data_cfg, s) for s in SPLITS},
            **{f'{s}_examples': len(open_tfds(data_cfg, s)) for s in SPLITS}}
  corpus = file_corpus(data_cfg)
  h = hashlib.sha1()
  total = 0
  for rel in corpus.rel_paths:
    st = os.stat(os.path.join(corpus.root, rel))
    total += st.st_size
    h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  out = {'source': data_cfg.source, 'root': corpus.root, 'split_mode': corpus.mode,
         'eval_fraction': corpus.eval_fraction, 'num_files': len(corpus.rel_paths),
         'total_bytes': total, 'files_fingerprint': h.hexdigest()}
  if data_cfg.source in ('jsonl', 'parquet'):
    out['text_key'] = data_cfg.text_key
  if data_cfg.source == 'stdlib':
    out['python_version'] = platform.python_version()
  return out


# ------------------------------------------------------------------------- TFDS


def tfds_split_name(data_cfg: ml_collections.ConfigDict, split: str) -> str:
  return data_cfg.train_split if resolve_split(data_cfg, split) == 'train' else data_cfg.eval_split


def first_line(e: BaseException) -> str:
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
    raise ConfigError(f'data.source=tfds needs tensorflow-datasets ({first_line(e)}); '
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
        f"({first_line(e)}); prepare it with --file_format=array_record.") from None
  except ImportError as e:  # A builder whose code needs TensorFlow or another module.
    raise ConfigError(f"data.name: loading TFDS dataset '{name}' needs a missing module "
                      f"({first_line(e)}); install it or use another data.source.") from None
  except ValueError as e:
    if 'split' in str(e).lower():
      raise ConfigError(
          f"data.train_split/data.eval_split: '{split}' is not a split of TFDS dataset "
          f"'{name}' ({first_line(e)}).") from None
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


def check_source(data_cfg: ml_collections.ConfigDict) -> None:
  if data_cfg.source not in SOURCES:
    raise ConfigError(f'data.source={data_cfg.source!r} is unknown; allowed: {list(SOURCES)}.')


def _check_eval_fraction(data_cfg: ml_collections.ConfigDict) -> None:
  if not 0.0 < float(data_cfg.eval_fraction) < 1.0:
    raise ConfigError(f'data.eval_fraction={data_cfg.eval_fraction} must be in (0, 1).')


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[str] | Iterator[str]:
  """The texts of ``split``: random access for TFDS, a lazy iterator for files."""
  check_source(data_cfg)
  if data_cfg.source == 'tfds':
    return TfdsTexts(data_cfg, split)
  if data_cfg.source == 'tokens':
    raise ConfigError('data.source=tokens holds token ids, not text; train a SentencePiece '
                      'model on the raw source (launch.prepare_data does and saves it in the store).')
  return file_documents(data_cfg, split)


def training_texts(data_cfg: ml_collections.ConfigDict) -> Iterator[str]:
  """Train-split texts in a fixed order, lazily (to train a tokenizer on a prefix)."""
  yield from documents(data_cfg, 'train')


