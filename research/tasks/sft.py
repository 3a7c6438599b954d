"""Supervised fine-tuning on prompt/response pairs: next-token loss on the response only.

Data (``data.source``):
  * ``stdlib`` (offline): documented functions of the standard library, prompt = the
    signature and docstring, response = the body (research/data/functions_task.py;
    split by file like the classification task).
  * ``text_files``: JSONL files (``data.path`` glob), one ``{"prompt": ..., "response":
    ...}`` object per line (keys ``finetune.prompt_key`` / ``finetune.response_key``); a
    line is in eval when the hash of ``path:line`` falls under ``data.eval_fraction``.
  * ``tfds``: a dataset with those two text features.

Each example is ``[BOS] prompt response [EOS]`` (the prompt cut to at most half of
``seq_len``, the whole cut to ``seq_len + 1`` tokens), one per row, right-padded.
Batches are LM batches (``inputs``, ``targets``, ``mask`` [B, L]) whose ``mask`` is 1
only where the *target* is a response token (or the final EOS): the prompt is context,
never a target, so the loss and its gradient ignore it.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Sequence

import ml_collections
import numpy as np

from research.config import ConfigError
from research.data import examples, sources
from research.data.tokenizers import Tokenizer
from research.tasks import Task
from research.tasks.lm import build_transformer, lm_task_fns


def _jsonl_pairs(config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  d, f = config.data, config.finetune
  paths = sorted(p for p in glob.glob(os.path.expanduser(d.path), recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"data.path: glob '{d.path}' matched no JSONL files for task=sft.")
  want_eval = split == 'eval'
  out = []
  for path in paths:
    with open(path, encoding='utf-8') as fh:
      for i, line in enumerate(fh):
        if not line.strip():
          continue
        if sources.path_in_eval(f'{os.path.basename(path)}:{i}', d.eval_fraction) != want_eval:
          continue
        try:
          ex = json.loads(line)
          out.append((str(ex[f.prompt_key]), str(ex[f.response_key])))
        except (ValueError, KeyError, TypeError):
          raise ConfigError(
              f'{path}:{i + 1}: expected a JSON object with "{f.prompt_key}" and '
              f'"{f.response_key}" (finetune.prompt_key / finetune.response_key).') from None
  return out


class PairSource(Sequence):
  """(prompt, response) pairs of one split; random access."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    split = sources.resolve_split(config.data, split)
    self._tfds = None
    if config.data.source == 'stdlib':
      from research.data import functions_task
      self._pairs = functions_task.sft_pairs(float(config.data.eval_fraction))[split]
    elif config.data.source == 'text_files':
      self._pairs = tuple(_jsonl_pairs(config, split))
    elif config.data.source == 'tfds':
      self._tfds = sources.open_tfds(config.data, split)
      self.keys = (config.finetune.prompt_key, config.finetune.response_key)
      self._pairs = None
    else:
      raise ConfigError(f'data.source={config.data.source!r} is unknown for task=sft.')

  def __len__(self) -> int:
    return len(self._pairs) if self._pairs is not None else len(self._tfds)

  def __getitem__(self, i: int) -> tuple[str, str]:  # type: ignore[override]
    if self._pairs is not None:
      return self._pairs[i]
    ex = self._tfds[i]
    return sources._as_text(ex[self.keys[0]]), sources._as_text(ex[self.keys[1]])


class EncodePair:
  """(prompt, response) -> {'inputs', 'targets', 'mask'} of length ``seq_len``."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int):
    self.tokenizer, self.seq_len = tokenizer, seq_len

  def __call__(self, pair: tuple[str, str]) -> dict[str, np.ndarray]:
    prompt, response = pair
    tok = self.tokenizer
    bos = [tok.bos_id] if getattr(tok, 'bos_id', None) is not None else []
    p = np.concatenate([np.asarray(bos, np.int32),
                        np.asarray(tok.encode(prompt), np.int32)])[:self.seq_len // 2]
    r = np.append(np.asarray(tok.encode(response), np.int32), tok.eos_id).astype(np.int32)
    toks = np.concatenate([p, r])[:self.seq_len + 1]
    is_response = np.arange(len(toks)) >= len(p)
    n = len(toks) - 1
    inputs = np.full([self.seq_len], tok.pad_id, np.int32)
    targets = np.full([self.seq_len], tok.pad_id, np.int32)
    mask = np.zeros([self.seq_len], np.float32)
    inputs[:n], targets[:n] = toks[:-1], toks[1:]
    mask[:n] = is_response[1:]
    return {'inputs': inputs, 'targets': targets, 'mask': mask}


def make_sft_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                      batch_size_per_process: int, process_index: int = 0,
                      process_count: int = 1, shuffle: bool = True, repeat: bool = True):
  """A checkpointable grain iterator of SFT batches (see the module doc)."""
  src = PairSource(config, split)
  if len(src) == 0:
    raise ConfigError(f'the {split} split of the SFT data is empty.')
  return examples.example_iterator(
      src, EncodePair(tokenizer, config.seq_len), seed=config.seed,
      batch_size_per_process=batch_size_per_process, process_index=process_index,
      process_count=process_count, shuffle=shuffle, repeat=repeat,
      num_threads=2 if config.data.source == 'tfds' else 0)


def make_task(config: ml_collections.ConfigDict) -> Task:
  return Task(name='sft', make_iterator=make_sft_iterator,
              build_model=functools.partial(build_transformer, config), decode_samples=True,
              **lm_task_fns(config))
