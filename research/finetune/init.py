"""Start a fine-tuning run from a pretrained model: partial restore with a report.

Sources (``finetune.init_from``):
  * one of our runs: its workdir (``config.json`` + ``checkpoints/``) or the
    ``checkpoints/`` directory itself; ``finetune.init_step`` picks the step (-1 latest).
    Only the model parameters are read (:func:`research.runs.restore_params`), straight
    into the new run's shardings, so the source may have been saved on any mesh.
  * a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``),
    Llama-family or GPT-2 (research/models/hf_import.py). Read only: never trained into.

:func:`take_architecture` (before the tokenizer is built) copies the source's
architecture (:data:`ARCH_KEYS` of ``model.*``) and tokenizer into the config.
:func:`initialize` (fresh start only) matches parameters by path:
  * loaded: in both (shapes must agree, else one error lists every mismatch);
  * created: only in the new model (task heads, LoRA adapters): keep their init;
  * ignored: only in the source (e.g. ``unembed`` under a classifier).
It writes ``WORKDIR/init_report.json`` and logs the counts, with the trainable and
frozen parameter counts of the run's mode.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from research import runs
from research.config import ConfigError

# model.* keys that define the backbone's parameters: taken from the source.
ARCH_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
             'mlp_kind', 'mlp_dim', 'norm', 'norm_eps', 'positions', 'rope_theta',
             'rope_scaling', 'rope_factor', 'rope_low_freq_factor', 'rope_high_freq_factor',
             'rope_original_max_len', 'rope_beta_fast', 'rope_beta_slow',
             'rope_attention_factor', 'rope_truncate', 'sliding_window', 'window_layers',
             'max_seq_len', 'tie_embeddings', 'use_bias', 'scan_layers')
# data.* keys that define the tokenizer: taken from one of our sources.
TOKENIZER_KEYS = ('tokenizer', 'spm_vocab_size', 'spm_train_chars')
REPORT = 'init_report.json'


def take_architecture(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Copies the source's ``model.*`` shape keys (and our source's tokenizer) in place."""
  f = config.finetune
  if not os.path.exists(f.init_from):
    raise runs.RunError(f'finetune.init_from={f.init_from!r} does not exist; set it to a '
                        f'pretraining workdir or an HF checkpoint directory (or set '
                        f'finetune.pretrain_config to create it).')
  if runs.is_hf_dir(f.init_from):
    from research.models import hf_import
    arch = hf_import.model_config(f.init_from)
    arch['scan_layers'] = bool(config.model.scan_layers)  # Import handles both layouts.
  else:
    if not runs.is_run_dir(f.init_from):
      raise runs.RunError(
          f'finetune.init_from={f.init_from!r}: no config.json of a run found (expected a '
          f'workdir written by launch.train, or its checkpoints/ directory); set '
          f'finetune.pretrain_config to pretrain it first, or point it at an HF checkpoint.')
    src = runs.read_config(f.init_from)
    arch = {k: src.model[k] for k in ARCH_KEYS}
    for k in TOKENIZER_KEYS:
      config.data[k] = src.data[k]
    check_split_overlap(config, src)
    if workdir:
      _copy_tokenizer(f.init_from, src.data.tokenizer, workdir)
  changed = {k: (config.model[k], v) for k, v in arch.items() if config.model[k] != v}
  for k, v in arch.items():
    config.model[k] = v
  if changed:
    logging.info('finetune: model.* from %s: %s', f.init_from,
                 ', '.join(f'{k}={v[1]!r}' for k, v in sorted(changed.items())))
  if config.seq_len > config.model.max_seq_len:
    raise ConfigError(f'seq_len={config.seq_len} exceeds the pretrained model\'s '
                      f'max_seq_len={config.model.max_seq_len}; lower seq_len.')


def check_split_overlap(config: ml_collections.ConfigDict,
                        src: ml_collections.ConfigDict) -> None:
  """Warns when this run's eval files may be files the source trained on.

  File sources are split by a hash of each path against ``data.eval_fraction``: a
  larger fraction's eval split contains files the source run (smaller fraction, same
  corpus) trained on. ``finetune.match_source_split`` takes the source's fraction.
  """
  d, s = config.data, src.data
  same_corpus = d.source == s.source and (d.source == 'stdlib' or d.path == s.path)
  if not same_corpus or d.source not in ('stdlib', 'text_files', 'jsonl', 'parquet'):
    return
  if config.finetune.match_source_split:
    if d.eval_fraction != s.eval_fraction:
      logging.info('finetune.match_source_split: data.eval_fraction %s -> %s (the source\'s)',
                   d.eval_fraction, s.eval_fraction)
      d.eval_fraction = s.eval_fraction
    return
  if d.eval_fraction > s.eval_fraction:
    logging.warning(
        'finetune: data.eval_fraction=%s > the source run\'s %s on the same corpus: this '
        'run\'s eval files include files the source pretrained on, so its eval overstates '
        'generalisation. Set finetune.match_source_split=True (or data.eval_fraction=%s).',
        d.eval_fraction, s.eval_fraction, s.eval_fraction)


def source_tokenizer(config: ml_collections.ConfigDict, default):
  """The HF source's tokenizer.json (research.models.hf_import.HFTokenizer) when it has
  one; else ``default`` (the ``data.tokenizer`` one, copied from our source's config)."""
  f = config.finetune
  if not runs.is_hf_dir(f.init_from):
    return default
  if not os.path.exists(os.path.join(f.init_from, 'tokenizer.json')):
    logging.warning('finetune: HF source %s has no tokenizer.json; using data.tokenizer=%s '
                    '(ids must fit its vocabulary of %d).', f.init_from,
                    config.data.tokenizer, config.model.vocab_size)
    return default
  from research.models import hf_import
  return hf_import.HFTokenizer(f.init_from)


def _copy_tokenizer(init_from: str, tokenizer: str, workdir: str) -> None:
  """A SentencePiece source: its model file goes to WORKDIR/tokenizer/ (same ids)."""
  if tokenizer != 'sentencepiece':
    return
  from research.data.tokenizers import spm_model_path
  src, dst = spm_model_path(init_from), spm_model_path(workdir)
  if not os.path.exists(src):
    raise runs.RunError(f'finetune.init_from={init_from!r} uses a SentencePiece tokenizer '
                        f'but {src} is missing.')
  if not os.path.exists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst + '.tmp')
    os.replace(dst + '.tmp', dst)


def initialize(config: ml_collections.ConfigDict, trainable: Any, ts, workdir: str):
  """The train state with the source's parameters loaded (fresh runs only); writes the
  report. Returns the new ``ts.state``."""
  model_state = ts.state[0]
  target = runs.flat_params(model_state)
  f = config.finetune
  if not f.init_from:
    arrays, report = {}, {'source': None, 'kind': 'scratch', 'step': None, 'ignored': []}
  elif runs.is_hf_dir(f.init_from):
    arrays, report = runs.restore_hf_params(f.init_from, config.model, model_state)
  else:
    arrays, report = runs.restore_params(f.init_from, f.init_step, model_state,
                                         what='finetune.init_from')
  trained = {'/'.join(map(str, p)) for p, _ in
             nnx.to_flat_state(nnx.state(nnx.merge(ts.graphdef, ts.state)[0], trainable))}
  trained &= set(target)
  loaded = sorted(arrays)
  created = sorted(set(target) - set(arrays))
  lora = sorted(p for p, v in target.items() if isinstance(v, nnx.LoRAParam))
  count = runs.param_count
  report.update(
      mode=f.mode, loaded=loaded, created=created,
      loaded_params=count(target, loaded), created_params=count(target, created),
      trainable_params=count(target, trained),
      frozen_params=count(target, set(target) - trained),
      lora_params=count(target, lora), trainable=sorted(trained))
  logging.info('finetune init from %s (%s, step %s): loaded %d tensors (%s params), created '
               '%d (%s), ignored %d: %s; mode=%s trains %s params, %s frozen',
               report['source'], report['kind'], report['step'], len(loaded),
               f'{report["loaded_params"]:,}', len(created), ', '.join(created[:6]) +
               (' ...' if len(created) > 6 else ''), len(report['ignored']),
               ', '.join(report['ignored'][:4]), f.mode, f'{report["trainable_params"]:,}',
               f'{report["frozen_params"]:,}')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, REPORT), 'w') as fh:
      json.dump(report, fh, indent=2)
  return runs.replace_params(ts.state, arrays) if arrays else ts.state
