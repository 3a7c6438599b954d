"""Bad numerics, corrupt or mismatched checkpoints, and kill -9 at random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from research.checkpoint import CheckpointError
from tests.helpers import REPO, run_cli, smoke_config


def _train_losses(workdir):
  from research.metrics import read_metrics
  return {r['step']: r['loss'] for r in read_metrics(workdir) if r['split'] == 'train'}


def test_nan_stop_names_step_and_parameter(tmp_path):
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               f'--workdir={tmp_path}', '--config.debug.inject_nan_at_step=3',
               '--config.debug.inject_nan_regex=mlp/wo'])
  assert r.returncode == 1, r.stderr[-2000:]
  line = [l for l in r.stderr.splitlines() if l.startswith('error:')][0]
  assert 'at step 3' in line and 'blocks/mlp/wo/kernel' in line, line


def test_nan_skip_drops_the_update_and_counts_it(tmp_path):
  from research.recipe import run as train
  c = smoke_config(**{'nan_policy': 'skip', 'debug.inject_nan_at_step': 2,
                      'log_every': 1, 'steps': 4})
  summary = train(c, str(tmp_path))
  assert summary['skipped_steps'] == 1
  losses = _train_losses(str(tmp_path))
  assert all(v == v for v in losses.values())  # No NaN reached the weights.
  assert summary['final_eval_loss'] == summary['final_eval_loss']


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
  from research.recipe import run as train
  train(smoke_config(steps=3), str(tmp_path))
  with pytest.raises(CheckpointError, match='does not match'):
    train(smoke_config(steps=6, **{'model.d_model': 48}), str(tmp_path))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  from research.recipe import run as train
  train(smoke_config(steps=3), str(tmp_path))
  state_dir = os.path.join(tmp_path, 'checkpoints', '3', 'state')
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  r = run_cli(['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
               f'--workdir={tmp_path}'])
  assert r.returncode == 1
  lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert lines and 'checkpoint step 3' in lines[0], r.stderr[-2000:]


def _start(workdir, extra=()):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
       f'--workdir={workdir}', *_KILL_FLAGS, *extra],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


_KILL_FLAGS = ('--config.steps=24', '--config.checkpoint_every=2', '--config.log_every=1',
               '--config.eval_every=8', '--config.model.dropout=0.1')


def test_sigkill_at_random_moments_resumes_bitwise(tmp_path):
  """>= 5 kill -9s (one of them inside a checkpoint save); final losses are bitwise equal."""
  ref = tmp_path / 'reference'
  assert _start(ref).wait(timeout=600) == 0
  reference = _train_losses(ref)

  wd = tmp_path / 'killed'
  rng = random.Random(0)
  kills = 0
  # One deterministic kill in the middle of an (async) checkpoint save.
  p = _start(wd, ['--config.debug.sigkill_after_save_step=4'])
  assert p.wait(timeout=600) == -signal.SIGKILL
  kills += 1
  while kills < 6:
    p = _start(wd)
    metrics = wd / 'metrics.jsonl'
    start_rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    deadline = time.time() + 300
    target = rng.randint(1, 3)
    while time.time() < deadline and p.poll() is None:
      rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
      if rows >= start_rows + target:
        break
      time.sleep(0.05)
    if p.poll() is not None:  # Finished before we could kill it: fine, stop killing.
      break
    time.sleep(rng.random() * 0.3)
    p.kill()
    p.wait()
    kills += 1
  assert kills >= 5, kills
  p = _start(wd)
  assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
  got = _train_losses(wd)
  assert sorted(got) == list(range(1, 25))
  assert got == reference
  print(f'survived {kills} kills')


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path):
  """Writes fail (file-size limit, as on a full disk): clear error, step 3 still resumes."""
  import resource
  flags = ['launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
           f'--workdir={tmp_path}', '--config.checkpoint_every=3', '--config.model.d_model=64']
  assert run_cli(flags + ['--config.steps=3']).returncode == 0

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', *flags, '--config.steps=6'], cwd=REPO, env=env,
                     capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
  assert r.returncode == 1
  line = [l for l in r.stderr.splitlines() if l.startswith('error:')][-1]
  assert 'checkpoint save' in line and 'File too large' in line, line
  assert 'previous checkpoint (step 3) is intact' in line, line
  r = run_cli(flags + ['--config.steps=6'])
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['resumed_from_step'] == 3
