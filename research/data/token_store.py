"""A prepared token store: a corpus tokenized once into sharded binary token files.

Layout of a store directory::

  manifest.json            format, token dtype, tokenizer and source fingerprints,
                           per split: shards with token/document/byte counts
  train/00000.tokens ...   raw little-endian uint16 (vocab <= 65536) or uint32 token ids
                           (a numpy memmap can open them); every document is followed by
                           EOS, shards concatenate in order
  train/00000.docs  ...    int64 end offset (exclusive, EOS included) of each document
                           within its shard: the document boundaries
  eval/...

Why flat numpy shards and not ArrayRecord: the pipeline reads *windows* (L+1
consecutive tokens at any offset of the split's token stream), not records. A window
of a flat shard is one ``pread`` (two where it crosses a shard boundary), for any
``seq_len``, with no dependency and no index beyond the shard sizes. ArrayRecord would
store fixed records (windows of one ``seq_len``), so a store could not serve another
``seq_len``, and reads would go through its record reader. Windows are read with
``pread`` rather than through a memmap: mapped pages count in the process's RSS (on
this machine's kernel each random read mapped ~1.5 MB, so RSS grew with every batch and
with the corpus), whereas ``pread`` leaves the data in the page cache only; a training
process's memory is then the same for a 100 MB and a 1 GB store (README "Choosing
data"). ``np.memmap`` is still how tests and tools read a whole split.

Preparation (:func:`prepare`) runs over *groups* of input items (contiguous runs of
files, byte ranges of JSONL files, row-group ranges of Parquet files), one shard per
group, in a ``spawn`` process pool; the order of the shards is the order of the items,
so the token stream is the same for any number of workers. A run that names a raw
source (``stdlib``, ``text_files``, ``jsonl``, ``parquet``) calls :func:`ensure_store`,
which prepares into a cache directory keyed by the source and tokenizer fingerprints
(under ``data.cache_dir``, default ``~/.cache/research/tokens``; never inside the
corpus) once, under a file lock, and reuses it afterwards.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from research.config import ConfigError
from research.data import sources

FORMAT = 'research-token-store-v1'
# Bumped when reading or tokenizing changes what a store holds: cached stores are redone.
READER_VERSION = 2
MANIFEST = 'manifest.json'
_log = logging.getLogger(__name__)
# Texts are encoded in batches of about this many characters (bounds a worker's memory).
_ENCODE_CHARS = 8 << 20
# Inputs smaller than this are prepared in-process: a pool's start-up would dominate.
_POOL_MIN_BYTES = 64 << 20


class StoreError(ConfigError):
  """A token store cannot be used as configured (one line naming the key and the fix)."""


def default_cache_dir() -> str:
  return os.environ.get('RESEARCH_DATA_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'research', 'tokens')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
  return {'fingerprint': tokenizer.fingerprint, 'vocab_size': int(tokenizer.vocab_size),
          'eos_id': int(tokenizer.eos_id), 'pad_id': int(tokenizer.pad_id)}


# ------------------------------------------------------------------------ writing


def _write_group(args: tuple) -> dict[str, Any]:
  """Worker: tokenizes one group of items into ``out/<name>.tokens`` + ``.docs``."""
  spec, items, tokenizer, out_dir, name, dtype = args
  stats = sources.ReadStats()
  tok_path = os.path.join(out_dir, name + '.tokens')
  doc_path = os.path.join(out_dir, name + '.docs')
  n_tokens, ends = 0, []
  eos = np.array([tokenizer.eos_id], np.int32)
  with open(tok_path, 'wb') as ft:
    batch: list[str] = []
    chars = 0

    def flush():
      nonlocal n_tokens, batch, chars
      if not batch:
        return
      parts = []
      for ids in tokenizer.encode_batch(batch):
        parts += [ids, eos]
        n_tokens += len(ids) + 1
        ends.append(n_tokens)
      np.concatenate(parts).astype(dtype).tofile(ft)
      batch, chars = [], 0

    for text in sources.item_documents(spec, items, stats):
      batch.append(text)
      chars += len(text)
      if chars >= _ENCODE_CHARS:
        flush()
    flush()
  np.asarray(ends, np.int64).tofile(doc_path)
  return {'name': name, 'tokens': n_tokens, 'docs': len(ends), 'stats': stats.to_dict()}


def _groups(items: Sequence[sources.Item], workers: int) -> list[list[sources.Item]]:
  """Contiguous groups of items, about ``total / (4 * workers)`` bytes each (>= 1 MB)."""
  total = sum(it.size for it in items)
  target = max(1 << 20, min(256 << 20, total // max(1, 4 * workers)))
  groups, cur, size = [], [], 0
  for it in items:
    cur.append(it)
    size += it.size
    if size >= target:
      groups.append(cur)
      cur, size = [], 0
  if cur or not groups:
    groups.append(cur)
  return groups


def prepare(data_cfg: Any, tokenizer: Any, out_dir: str, *, workers: int = 0) -> dict:
  """Tokenizes both splits of ``data_cfg``'s raw source into a store at ``out_dir``.

  Writes into ``out_dir + '.tmp-<pid>'`` and renames at the end, so a killed preparation
  never leaves a store that looks complete. Returns the manifest.
  """
  t0 = time.perf_counter()
  spec = sources.source_spec(data_cfg)
  workers = workers or (os.cpu_count() or 1)
  dtype = token_dtype(tokenizer.vocab_size)
  tmp = f'{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  manifest: dict[str, Any] = {
      'format': FORMAT, 'dtype': dtype.name, 'tokenizer': tokenizer_info(tokenizer),
      'source': sources.source_fingerprint(data_cfg), 'splits': {}}
  jobs, split_of = [], []
  for split in sources.SPLITS:
    os.makedirs(os.path.join(tmp, split))
    items = sources.split_items(data_cfg, split)
    for i, group in enumerate(_groups(items, workers)):
      jobs.append((spec, group, tokenizer, os.path.join(tmp, split), f'{i:05d}', dtype))
      split_of.append((split, sum(it.size for it in group)))
  total_bytes = sum(s for _, s in split_of)
  n_proc = min(workers, len(jobs))
  if n_proc > 1 and total_bytes >= _POOL_MIN_BYTES:
    with multiprocessing.get_context('spawn').Pool(n_proc) as pool:
      results = pool.map(_write_group, jobs, chunksize=1)
  else:
    results, n_proc = [_write_group(j) for j in jobs], 1
  warnings = sources.ReadStats()
  for (split, nbytes), res in zip(split_of, results):
    s = manifest['splits'].setdefault(split, {'shards': [], 'tokens': 0, 'docs': 0,
                                              'bytes': 0})
    s['shards'].append({'name': res['name'], 'tokens': res['tokens'], 'docs': res['docs']})
    s['tokens'] += res['tokens']
    s['docs'] += res['docs']
    s['bytes'] += nbytes
    warnings.merge(sources.ReadStats(**res['stats']))
  manifest['read'] = warnings.to_dict()
  manifest['prepare'] = {'seconds': time.perf_counter() - t0, 'workers': n_proc,
                         'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
  with open(os.path.join(tmp, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  tokens = sum(s['tokens'] for s in manifest['splits'].values())
  _log.info('Prepared %s: %d tokens (%.1f MB of text) in %.1fs with %d worker(s) -> %s',
            data_cfg.source, tokens, total_bytes / 1e6, manifest['prepare']['seconds'], n_proc,
            out_dir)
  return manifest


def cache_key(data_cfg: Any, tokenizer: Any) -> str:
  blob = json.dumps({'format': FORMAT, 'reader': READER_VERSION,
                     'source': sources.source_fingerprint(data_cfg),
                     'tokenizer': tokenizer.fingerprint}, sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:20]


def ensure_store(data_cfg: Any, tokenizer: Any) -> str:
  """The store of a raw source: prepared into the cache once (under a lock), then reused."""
  if data_cfg.source == 'tokens':
    return os.path.expanduser(data_cfg.path)
  root = os.path.expanduser(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
  path = os.path.join(root, f'{data_cfg.source}-{cache_key(data_cfg, tokenizer)}')
  if os.path.exists(os.path.join(path, MANIFEST)):
    return path
  try:
    os.makedirs(root, exist_ok=True)
    lock = open(path + '.lock', 'w')
  except OSError as e:
    raise StoreError(f'data.cache_dir: cannot write the token cache in {root} '
                     f'({e.strerror}); set data.cache_dir to a writable directory.') from None
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released by the OS if this process dies.
    if not os.path.exists(os.path.join(path, MANIFEST)):
      prepare(data_cfg, tokenizer, path, workers=int(data_cfg.prepare_workers))
  return path


# ------------------------------------------------------------------------ reading


@dataclasses.dataclass
class SplitStore:
  """One split of a store as one token stream: windows by pread, whole shards by memmap.

  Pickles (for grain workers) without its open files."""

  directory: str
  split: str
  dtype: str
  shard_names: tuple[str, ...]
  shard_tokens: tuple[int, ...]

  def __post_init__(self):
    self.starts = np.concatenate([[0], np.cumsum(self.shard_tokens, dtype=np.int64)])
    self._maps: list[np.ndarray] | None = None
    self._fds: dict[int, int] = {}

  def __del__(self, _close=os.close):  # Bound: os may be gone at interpreter exit.
    for fd in getattr(self, '_fds', {}).values():
      try:
        _close(fd)
      except OSError:
        pass

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getstate__(self) -> dict:
    return {k: getattr(self, k) for k in ('directory', 'split', 'dtype', 'shard_names',
                                          'shard_tokens')}

  def __setstate__(self, state: dict) -> None:
    self.__init__(**state)

  def _shards(self) -> list[np.ndarray]:
    if self._maps is None:
      self._maps = [
          np.memmap(os.path.join(self.directory, self.split, n + '.tokens'), self.dtype, 'r',
                    shape=(t,)) if t else np.zeros([0], self.dtype)
          for n, t in zip(self.shard_names, self.shard_tokens)]
    return self._maps

  def _fd(self, shard: int) -> int:
    if shard not in self._fds:
      if len(self._fds) >= 256:  # Bound open files for stores with very many shards.
        os.close(self._fds.pop(next(iter(self._fds))))
      path = os.path.join(self.directory, self.split, self.shard_names[shard] + '.tokens')
      self._fds[shard] = os.open(path, os.O_RDONLY)
    return self._fds[shard]

  def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows of ``length`` consecutive tokens from each global position in ``starts``
    (int32; positions past the end are 0). One ``pread`` per row and shard touched."""
    itemsize = np.dtype(self.dtype).itemsize
    out = np.zeros((len(starts), length), self.dtype)
    n = len(self)
    for r, s in enumerate(np.asarray(starts, np.int64).tolist()):
      pos, end = s, min(s + length, n)
      while pos < end:
        k = int(np.searchsorted(self.starts, pos, side='right')) - 1
        upto = min(end, int(self.starts[k + 1]))
        buf = os.pread(self._fd(k), (upto - pos) * itemsize, (pos - int(self.starts[k])) * itemsize)
        out[r, pos - s:upto - s] = np.frombuffer(buf, self.dtype)
        pos = upto
    return out.astype(np.int32)

  def take(self, idx: np.ndarray) -> np.ndarray:
    """Tokens at global positions ``idx`` (any shape, all < len) as int32."""
    idx = np.asarray(idx, np.int64)
    shards = self._shards()
    if len(shards) == 1:
      return np.asarray(shards[0][idx], np.int32)
    out = np.empty(idx.shape, np.int32)
    which = np.searchsorted(self.starts, idx, side='right') - 1
    for s in np.unique(which):
      sel = which == s
      out[sel] = shards[s][idx[sel] - self.starts[s]]
    return out

  def tokens(self) -> np.ndarray:
    """The whole split in memory, in the store's dtype (tests and small corpora only)."""
    shards = self._shards()
    return np.concatenate([np.asarray(m) for m in shards]) if shards else np.zeros([0], self.dtype)

  def doc_ends(self) -> np.ndarray:
    """Global end offsets of every document of the split (from the .docs files)."""
    parts = [np.fromfile(os.path.join(self.directory, self.split, n + '.docs'), np.int64) + s
             for n, s in zip(self.shard_names, self.starts[:-1])]
    return np.concatenate(parts) if parts else np.zeros([0], np.int64)


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise StoreError(f"data.path={directory!r} is not a token store (no {MANIFEST}); make one "
                     f"with python -m launch.prepare_data --config=... --out={directory}.")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise StoreError(f'data.path={directory!r}: store format {manifest.get("format")!r} is not '
                     f'{FORMAT!r}; prepare it again with python -m launch.prepare_data.')
  return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, directory: str) -> None:
  want = manifest['tokenizer']['fingerprint']
  if want != tokenizer.fingerprint:
    raise StoreError(
        f'data.path={directory!r} was tokenized with {want[:24]!r}, but this run uses '
        f'data.tokenizer={tokenizer.fingerprint[:24]!r}; prepare the store again with this '
        f'run\'s tokenizer (python -m launch.prepare_data) or set data.tokenizer to match.')


def open_split(directory: str, split: str, tokenizer: Any) -> SplitStore:
  manifest = read_manifest(directory)
  check_tokenizer(manifest, tokenizer, directory)
  if split not in manifest['splits']:
    raise StoreError(f'data.path={directory!r} has no {split!r} split; it has '
                     f'{sorted(manifest["splits"])}.')
  shards = manifest['splits'][split]['shards']
  return SplitStore(directory, split, manifest['dtype'], tuple(s['name'] for s in shards),
                    tuple(int(s['tokens']) for s in shards))


def describe(manifest: dict[str, Any]) -> str:
  """One line: source, files, split mode and sizes (logged at the start of a run)."""
  src = manifest['source']
  splits = manifest['splits']
  mb = lambda b: f'{b / 1e6:.1f} MB' if b >= 1e5 else f'{b / 1e3:.1f} KB'
  what = src['source']
  if 'num_files' in src:
    what += f" {src['num_files']} file{'s' * (src['num_files'] != 1)} ({mb(src['total_bytes'])})"
  mode = {'files': 'split by file hash', 'tail': 'split by tail',
          'splits': 'named splits'}.get(src.get('split_mode', ''), src.get('split_mode', ''))
  parts = [f"{s} {mb(splits[s]['bytes'])} = {splits[s]['tokens']:,} tokens, "
           f"{splits[s]['docs']:,} docs" for s in sources.SPLITS if s in splits]
  return f'data: {what}, {mode}: ' + ' / '.join(parts)
