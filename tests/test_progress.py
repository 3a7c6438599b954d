"""Train rows are window means; a resume with another model/data/batch is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from research.config import ConfigError
from tests.helpers import smoke_config


def _rows(workdir, split='train'):
  from research.metrics import read_metrics
  return [r for r in read_metrics(workdir) if r['split'] == split]


def test_train_rows_are_window_means_and_hparams_are_written(tmp_path):
  from research import recipe
  every = str(tmp_path / 'every')
  recipe.run(smoke_config(log_every=1, eval_steps=0, num_samples=0), every)
  windowed = str(tmp_path / 'windowed')
  recipe.run(smoke_config(log_every=3, eval_steps=0, num_samples=0), windowed)
  per_step = {r['step']: r['loss'] for r in _rows(every)}
  rows = _rows(windowed)
  assert [r['step'] for r in rows] == [3, 6]
  for r in rows:
    window = [per_step[s] for s in range(r['step'] - 2, r['step'] + 1)]
    assert r['loss_window'] == 3
    np.testing.assert_allclose(r['loss'], np.mean(window), rtol=1e-6)
    assert r['last_step_loss'] == per_step[r['step']]
  hparams = os.path.join(windowed, 'tensorboard', 'hparams')  # TensorBoard's HPARAMS tab.
  assert os.path.isdir(hparams) and os.listdir(hparams)


@pytest.mark.parametrize('change, key', [
    ({'data.source': 'text_files'}, 'data.source'),
    ({'batch_size': 16}, 'batch_size'),
    ({'model.d_model': 64}, None),  # Another model: the restore itself refuses it.
])
def test_resume_with_another_run_is_one_line_and_keeps_config(tmp_path, change, key):
  from research import recipe
  from research.runtime import UserError
  wd = str(tmp_path / 'run')
  base = smoke_config(steps=6, num_samples=0)
  recipe.run(base, wd, stop_at_step=3)
  before = open(os.path.join(wd, 'config.json')).read()
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('some text of another corpus\n' * 400)
  over = dict(change)
  if over.get('data.source') == 'text_files':
    over['data.path'] = str(corpus)
  with pytest.raises(UserError) as e:
    recipe.run(smoke_config(steps=6, num_samples=0, **over), wd)
  msg = str(e.value)
  assert '\n' not in msg and '--workdir' in msg, msg
  if key:
    assert isinstance(e.value, ConfigError) and key in msg and 'resume_check=False' in msg
  assert open(os.path.join(wd, 'config.json')).read() == before
  if key == 'batch_size':  # The override resumes anyway.
    out = recipe.run(smoke_config(steps=6, num_samples=0, resume_check=False, **over), wd)
    assert out['resumed_from_step'] == 3


def test_wandb_offline_writer_logs_rows(tmp_path, monkeypatch):
  """wandb.project set, offline mode: the run's rows and summary land under
  WORKDIR/wandb with no network."""
  pytest.importorskip('wandb')
  from research import recipe
  monkeypatch.setenv('WANDB_SILENT', 'true')
  wd = tmp_path / 'run'
  recipe.run(smoke_config(eval_steps=1, num_samples=0,
                          **{'wandb.project': 'research-test'}), str(wd))
  runs_dir = [d for d in os.listdir(wd / 'wandb' / 'wandb') if d.startswith('offline-run-')]
  assert len(runs_dir) == 1, os.listdir(wd / 'wandb')
  run_dir = wd / 'wandb' / 'wandb' / runs_dir[0]
  log, = [run_dir / f for f in os.listdir(run_dir) if f.endswith('.wandb')]
  data = log.read_bytes()  # W&B's record log: history/summary values as JSON strings.
  final = json.loads((wd / 'summary.json').read_text())
  for key in (b'train/loss', b'eval/loss', b'final_eval_loss'):
    assert key in data, key
  assert json.dumps(final['final_eval_loss']).encode() in data


def test_wandb_config_errors_are_one_line():
  from research.validation import validate_config
  with pytest.raises(ConfigError, match=r"wandb\.mode='cloud'"):
    validate_config(smoke_config(**{'wandb.mode': 'cloud'}))


def test_a_non_finite_step_is_never_checkpointed(tmp_path):
  """nan_policy=stop: the step whose gradients are NaN stops the run before its
  checkpoint is written, so a resume starts from the last finite state."""
  from research import recipe, runs
  from research.train import NonFiniteError
  wd = str(tmp_path / 'run')
  c = smoke_config(checkpoint_every=1, eval_steps=0, num_samples=0,
                   **{'debug.inject_nan_at_step': 3})
  with pytest.raises(NonFiniteError, match='step 3'):
    recipe.run(c, wd)
  steps = runs.checkpoint_steps(wd)  # Step 2's async save may still be committing.
  assert 1 in steps and 3 not in steps, steps


def test_eval_tasks_score_downstream_during_training_and_reach_the_sweep_table(tmp_path):
  """eval_tasks: each eval writes a downstream/<task> row; the sweep table shows it."""
  from research import recipe
  from research.sweep.results import downstream_cell
  arc = tmp_path / 'arc.jsonl'
  with open(arc, 'w') as f:
    for i in range(6):
      f.write(json.dumps({'question': f'def f{i}(x): return', 'answerKey': 'A',
                          'choices': {'label': ['A', 'B'], 'text': [' x', ' ))(']}}) + '\n')
  wd = str(tmp_path / 'run')
  recipe.run(smoke_config(num_samples=0, eval_tasks=f'mini=arc:{arc}'), wd)
  rows = [r for r in _rows(wd, 'downstream/mini')]
  assert [r['step'] for r in rows] == [3, 6]
  assert all(0.0 <= r['acc'] <= 1.0 and r['acc_low'] <= r['acc'] <= r['acc_high']
             for r in rows)
  assert downstream_cell(wd).startswith('mini ') and downstream_cell(wd).endswith('@6')
  with pytest.raises(ConfigError, match='eval_tasks'):
    from research.validation import validate_config
    validate_config(smoke_config(eval_tasks='nonsense_task'))
