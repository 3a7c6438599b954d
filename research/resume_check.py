"""Is a checkpoint's run the run we are resuming? A fingerprint saved with every step.

A resumed run must continue the same model on the same token stream. The fingerprint
holds what decides that: the model's shape keys, the tokenizer, the data source (and
its corpus fingerprint) and the batch schedule. On resume it is compared with the
current config's; any difference is one :class:`ConfigError` naming every changed key,
before anything is restored or written (so the run's ``config.json`` is not
overwritten). ``resume_check=False`` resumes anyway, with a warning per difference.
Checkpoints written before the fingerprint existed are resumed with a warning.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging

from research.config import ConfigError

MODEL_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
              'mlp_kind', 'mlp_dim', 'norm', 'positions', 'tie_embeddings', 'use_bias',
              'causal', 'rope_theta', 'rope_scaling', 'rope_factor', 'sliding_window',
              'window_layers')
DATA_KEYS = ('source', 'path', 'name', 'train_split', 'text_key', 'eval_fraction',
             'tokenizer', 'spm_vocab_size')
CORPUS_KEYS = ('fingerprint', 'files_fingerprint', 'store_source', 'tokenizer')


def fingerprint(config: ml_collections.ConfigDict, tokenizer: Any,
                corpus: dict[str, Any]) -> dict[str, Any]:
  """Flat ``{'model.d_model': 128, 'data.source': 'stdlib', ...}`` of a run."""
  out: dict[str, Any] = {}
  for k in MODEL_KEYS:
    if k in config.model:
      out[f'model.{k}'] = config.model[k]
  for k in DATA_KEYS:
    if k in config.data:
      out[f'data.{k}'] = config.data[k]
  for k in CORPUS_KEYS:
    if k in corpus:
      out[f'corpus.{k}'] = corpus[k]
  out['tokenizer'] = str(getattr(tokenizer, 'fingerprint', type(tokenizer).__name__))
  out['batch_size'] = config.batch_size
  out['seq_len'] = config.seq_len
  out['batch_ramp'] = repr(sorted(config.batch_ramp.to_dict().items()))
  out['task'] = config.task
  return out


def _norm(v: Any) -> Any:
  return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def check(saved: dict[str, Any] | None, current: dict[str, Any], *, workdir: str, step: int,
          enforce: bool) -> None:
  """Raises (``enforce``) or warns when the checkpoint's fingerprint differs."""
  if saved is None:
    logging.warning('checkpoint step %d in %s has no resume fingerprint (written by an older '
                    'version); resuming without checking model, data and batch schedule.',
                    step, workdir)
    return
  changed = [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
             if _norm(saved.get(k)) != _norm(current.get(k))]
  if not changed:
    return
  what = '; '.join(f'{k}: {old!r} -> {new!r}' for k, old, new in changed)
  if not enforce:
    for k, old, new in changed:
      logging.warning('resume_check=False: resuming step %d although %s changed (%r -> %r)',
                      step, k, old, new)
    return
  raise ConfigError(
      f'{workdir} holds a run whose checkpoint (step {step}) differs from this config: '
      f'{what}. Resuming would continue another run; use a new --workdir to start fresh, '
      f'or --config.resume_check=False to resume anyway.')
