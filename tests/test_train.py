"""End-to-end trainer tests: output contract, learning, exact resume, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from research.config import ConfigError
from tests.helpers import run_cli, smoke_config


def _rows(workdir, split='train'):
  from research.metrics import read_metrics
  return [r for r in read_metrics(workdir) if r['split'] == split]


def test_run_writes_output_contract(tmp_path):
  from research.recipe import run as train
  wd = str(tmp_path / 'run')
  summary = train(smoke_config(), wd)
  cfg = json.load(open(os.path.join(wd, 'config.json')))
  for key in ('config', 'jax_version', 'device_kind', 'device_count', 'process_count',
              'mesh_shape', 'param_count', 'corpus'):
    assert key in cfg, key
  assert cfg['config']['model']['vocab_size'] == 259  # Resolved from the byte tokenizer.
  train_rows = _rows(wd)
  assert train_rows, 'no train rows'
  for key in ('step', 'split', 'loss', 'learning_rate', 'batch_size', 'tokens_per_sec',
              'mfu', 'step_time_s'):
    assert key in train_rows[-1], key
  eval_rows = _rows(wd, 'eval')
  assert [r['step'] for r in eval_rows] == [3, 6]
  assert os.listdir(os.path.join(wd, 'tensorboard'))
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints'))
                if s.isdigit()) == [3, 6]
  saved = json.load(open(os.path.join(wd, 'summary.json')))
  for key in ('final_train_loss', 'final_eval_loss', 'wall_time_s', 'steps', 'tokens_seen',
              'param_count', 'peak_tokens_per_sec', 'peak_mfu'):
    assert saved[key] is not None, key
  assert saved['tokens_seen'] == 6 * 8 * 32
  assert summary['final_eval_loss'] == saved['final_eval_loss']
  assert os.path.getsize(os.path.join(wd, 'samples.txt')) > 0


def test_loss_goes_down(tmp_path):
  from research.recipe import run as train
  c = smoke_config(steps=40, log_every=5, eval_every=40, checkpoint_every=40,
                   **{'optimizer.learning_rate': 1e-2, 'optimizer.warmup_steps': 5})
  train(c, str(tmp_path))
  rows = _rows(str(tmp_path))
  first, last = rows[0]['loss'], rows[-1]['loss']
  assert last < first - 1.0, (first, last)
  assert _rows(str(tmp_path), 'eval')[-1]['loss'] < np.log(259) - 1.0


def test_resume_is_bitwise_exact(tmp_path):
  """Stopped after K steps and resumed == uninterrupted, bitwise, no duplicate rows."""
  from research.recipe import run as train
  c = smoke_config(steps=8, log_every=1, eval_every=4, checkpoint_every=100,
                   **{'model.dropout': 0.1})
  full = str(tmp_path / 'full')
  train(c, full)
  parts = str(tmp_path / 'parts')
  out = train(c, parts, stop_at_step=4)
  assert out['stopped_at_step'] == 4
  # A row written after the checkpoint by a run that then crashed must be dropped.
  with open(os.path.join(parts, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 5, 'split': 'train', 'loss': 123.0}) + '\n')
  summary = train(c, parts)
  assert summary['resumed_from_step'] == 4
  a, b = _rows(full), _rows(parts)
  assert [r["step"] for r in b] == list(range(1, 9)), [r["step"] for r in b]
  assert {r['step']: r['loss'] for r in a} == {r['step']: r['loss'] for r in b}
  ea, eb = _rows(full, 'eval'), _rows(parts, 'eval')
  assert [(r['step'], r['loss']) for r in ea] == [(r['step'], r['loss']) for r in eb]


@pytest.mark.parametrize('overrides, needle', [
    ({'model.num_kv_heads': 3}, 'model.num_kv_heads'),
    ({'seq_len': 128}, 'model.max_seq_len'),
    ({'data.source': 'text_files', 'data.path': '/nonexistent/**/*.txt'}, 'data.path'),
    ({'mesh.tensor': 3}, 'mesh'),
])
def test_bad_config_is_one_clear_line_before_compiling(tmp_path, overrides, needle):
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               f'--workdir={tmp_path}', *args], env={'JAX_LOG_COMPILES': '1'})
  assert r.returncode == 1, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert 'Compiling' not in r.stderr, 'failed only after compiling'


def test_unknown_key_and_unwritable_workdir(tmp_path):
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               f'--workdir={tmp_path}', '--config.model.d_modle=64'])
  assert r.returncode == 1
  assert "unknown config key 'd_modle'" in r.stderr and "'d_model'" in r.stderr, r.stderr
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               f'--workdir={blocker}/sub'])
  assert r.returncode == 1
  assert 'not writable' in r.stderr and '--workdir' in r.stderr, r.stderr


def test_tokenizer_larger_than_model_vocab(tmp_path):
  from research.recipe import run as train
  with pytest.raises(ConfigError, match='model.vocab_size'):
    train(smoke_config(**{'model.vocab_size': 100}), str(tmp_path))
