"""What a data config names: checked before anything is read, described for config.json.

Kept apart from :mod:`research.data.sources` because it needs the tokenizers and the
token store, which themselves read through ``sources``: with these two functions in
``sources`` the three modules imported each other.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import ml_collections

from research.config import ConfigError
from research.data import token_store
from research.data.sources import (SPLITS, FileCorpus, TfdsTexts, check_source,
                                   first_line, file_corpus, open_tfds, tfds_split_name)
from research.data.tokenizers import SPM_MIN_VOCAB, TOKENIZERS


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Fails fast (before anything is compiled) on a data config that cannot work.

  Cheap: lists files (cached) or opens TFDS metadata; reads no document.
  """
  check_source(data_cfg)
  if data_cfg.tokenizer not in TOKENIZERS:
    raise ConfigError(f'data.tokenizer={data_cfg.tokenizer!r} is unknown; '
                      f'allowed: {list(TOKENIZERS)}.')
  if data_cfg.tokenizer == 'sentencepiece' and data_cfg.spm_vocab_size < SPM_MIN_VOCAB:
    raise ConfigError(f'data.spm_vocab_size={data_cfg.spm_vocab_size} is too small: byte '
                      f'fallback needs 256 byte pieces plus 4 special ids; use at least '
                      f'{SPM_MIN_VOCAB}.')
  if data_cfg.num_workers < 0:
    raise ConfigError(f'data.num_workers={data_cfg.num_workers} must be >= 0.')
  if getattr(data_cfg, 'prepare_workers', 0) < 0:
    raise ConfigError(f'data.prepare_workers={data_cfg.prepare_workers} must be >= 0 (0: all CPUs).')
  if data_cfg.source == 'tfds':
    for split in SPLITS:
      TfdsTexts(data_cfg, split)
  elif data_cfg.source == 'tokens':
    if not data_cfg.path:
      raise ConfigError("data.path is empty but data.source='tokens' needs a store directory "
                        "made by python -m launch.prepare_data --out=DIR.")
    token_store.read_manifest(os.path.expanduser(data_cfg.path))
  else:
    corpus = file_corpus(data_cfg)
    if data_cfg.source in ('jsonl', 'parquet'):
      _check_text_key(data_cfg, corpus)


def _check_text_key(data_cfg: ml_collections.ConfigDict, corpus: FileCorpus) -> None:
  """The first file has the field ``data.text_key`` (reads one line / the schema)."""
  rel = corpus.rel_paths[0]
  path = os.path.join(corpus.root, rel)
  key = data_cfg.text_key
  if data_cfg.source == 'parquet':
    import pyarrow.parquet as pq
    try:
      names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pylint: disable=broad-except  (pyarrow raises several types)
      raise ConfigError(f'data.path: {rel} is not a readable Parquet file '
                        f'({first_line(e)}).') from None
    if key not in names:
      raise ConfigError(f"data.text_key='{key}' is not a column of {rel}; it has {names}.")
    return
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        try:
          record = json.loads(line.decode('utf-8', errors='replace'))
        except ValueError:
          raise ConfigError(f'data.path: the first record of {rel} is not valid JSON; '
                            f'data.source=jsonl needs one JSON object per line.') from None
        if not isinstance(record, dict) or key not in record:
          fields = sorted(record) if isinstance(record, dict) else type(record).__name__
          raise ConfigError(f"data.text_key='{key}' is not a field of the first record of "
                            f"{rel}; it has {fields}.")
        return


def corpus_info(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the run reads, for its config.json: sizes per split and a fingerprint."""
  check_source(data_cfg)
  info: dict[str, Any] = {'source': data_cfg.source}
  if data_cfg.source == 'tfds':
    info.update(name=data_cfg.name, tfds_data_dir=data_cfg.tfds_data_dir,
                text_key=data_cfg.text_key)
    for split in SPLITS:
      info[f'{split}_split'] = tfds_split_name(data_cfg, split)
      info[f'{split}_examples'] = len(open_tfds(data_cfg, split))
    return info
  if data_cfg.source == 'tokens':
    manifest = token_store.read_manifest(os.path.expanduser(data_cfg.path))
    info.update(path=data_cfg.path, store_source=manifest['source'],
                tokenizer=manifest['tokenizer']['fingerprint'],
                **{f'{k}_tokens': v['tokens'] for k, v in manifest['splits'].items()})
    return info
  corpus = file_corpus(data_cfg)
  info.update(
      python_version=platform.python_version(),
      python_implementation=platform.python_implementation(),
      root=corpus.root, split_mode=corpus.mode, eval_fraction=corpus.eval_fraction,
      num_files=len(corpus.rel_paths), fingerprint=corpus.fingerprint,
      total_bytes=sum(os.path.getsize(os.path.join(corpus.root, r)) for r in corpus.rel_paths))
  if data_cfg.source != 'stdlib':
    info['path'] = data_cfg.path
  if data_cfg.source in ('jsonl', 'parquet'):
    info['text_key'] = data_cfg.text_key
  for split in SPLITS:
    paths = corpus.split_paths(split)
    info[f'{split}_files'] = len(paths)
    if corpus.mode == 'files':
      info[f'{split}_bytes'] = sum(os.path.getsize(os.path.join(corpus.root, r)) for r in paths)
  return info
