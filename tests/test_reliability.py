"""Bad numerics, corrupt or mismatched checkpoints, kill -9 at random moments, disk full.

Everything runs through ``python -m launch.train`` (the command users run) and compares
what lands on disk: the final checkpoint's arrays, bit for bit, and metrics.jsonl.

``RELIABILITY_KILLS=20 pytest -s tests/test_reliability.py -k sigkill`` reproduces the
fault-injection figures in the README (default: 6 kills, to keep the suite short).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, run_cli

TINY = '--config=experiments/pretrain/tiny.py:smoke=True'


def _train_rows(workdir) -> list[dict]:
  from research.metrics import read_metrics
  return [r for r in read_metrics(str(workdir)) if r['split'] == 'train']


def _losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in _train_rows(workdir)}


def _steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def _state_arrays(workdir, step: int | None = None) -> dict[str, np.ndarray]:
  """Every array of a checkpoint (params, optimizer moments, RNG, step), by path."""
  import jax
  import orbax.checkpoint as ocp
  step = _steps(workdir)[-1] if step is None else step
  tree = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state'))
  def host(x):  # The dropout RNG is a typed key array: compare its key data.
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return {jax.tree_util.keystr(p): host(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise_equal_state(a, b) -> int:
  """Same arrays, same dtypes, same bits; returns how many arrays were compared."""
  sa, sb = _state_arrays(a), _state_arrays(b)
  assert sorted(sa) == sorted(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
    assert sa[k].tobytes() == sb[k].tobytes(), f'{k} differs'
  return len(sa)


def _last_line(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  return lines[-1] if lines else ''


# --------------------------------------------------------------------------- numerics


def test_nan_stop_names_step_and_parameter(tmp_path):
  r = run_cli(['launch.train', TINY, f'--workdir={tmp_path}', '--config.debug.inject_nan_at_step=3',
               '--config.debug.inject_nan_regex=mlp/wo'])
  assert r.returncode == 1, r.stderr[-2000:]
  line = _last_line(r.stderr)
  assert line.startswith('error:') and 'at step 3' in line and 'blocks/mlp/wo/kernel' in line, \
      r.stderr[-2000:]


def test_nan_skip_drops_the_update_and_counts_it(tmp_path):
  r = run_cli(['launch.train', TINY, f'--workdir={tmp_path}', '--config.nan_policy=skip',
               '--config.debug.inject_nan_at_step=2', '--config.log_every=1',
               '--config.steps=4', '--config.num_samples=0'])
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['skipped_steps'] == 1
  assert all(np.isfinite(v) for v in _losses(tmp_path).values())  # No NaN in the weights.
  assert np.isfinite(summary['final_eval_loss'])
  assert all(np.all(np.isfinite(x)) for x in _state_arrays(tmp_path).values()
             if np.issubdtype(x.dtype, np.floating))


# --------------------------------------------------------------------------- checkpoints

# One finished run (checkpoints at steps 2, 4, 6) that the checkpoint tests copy and then
# damage or resume differently: trained once per module, not once per test.
FINISHED_FLAGS = [TINY, '--config.steps=6', '--config.checkpoint_every=2',
                  '--config.keep_checkpoints=3', '--config.log_every=1',
                  '--config.eval_every=100', '--config.num_samples=0']


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp('finished') / 'run'
  r = run_cli(['launch.train', *FINISHED_FLAGS, f'--workdir={wd}'])
  assert r.returncode == 0, r.stderr[-2000:]
  assert _steps(wd) == [2, 4, 6]
  return wd


def _copy_of(finished_run, workdir):
  shutil.copytree(finished_run, workdir)
  return workdir


def test_mismatched_checkpoint_is_a_clear_error_and_nothing_moves(tmp_path, finished_run):
  wd = _copy_of(finished_run, tmp_path / 'run')
  # resume_check=False: past the resume fingerprint, into the checkpoint's own check.
  r = run_cli(['launch.train', *FINISHED_FLAGS, f'--workdir={wd}', '--config.steps=8',
               '--config.model.d_model=48', '--config.resume_check=False'])
  assert r.returncode == 1
  line = _last_line(r.stderr)
  assert line.startswith('error: checkpoint step 6') and 'does not match' in line, r.stderr[-2000:]
  assert _steps(wd) == [2, 4, 6] and not os.path.exists(wd / 'checkpoints' / 'corrupt')


def _truncate_largest_data_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  victim = max(files, key=os.path.getsize)
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


def _delete_a_data_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  victim = max(files, key=os.path.getsize)  # Small ones may hold nothing a restore reads.
  os.remove(victim)
  return victim


def _delete_array_metadata(step_dir: str) -> str:
  victim = os.path.join(step_dir, 'state', '_METADATA')
  os.remove(victim)
  return victim


@pytest.mark.parametrize('corrupt', [_truncate_largest_data_file, _delete_a_data_file,
                                     _delete_array_metadata])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_step(tmp_path, corrupt,
                                                                         finished_run):
  """Step 6 of a finished run goes bad: the rerun says so, keeps it aside, resumes from
  step 4 and ends with the same arrays (bitwise) and losses as the uninterrupted run."""
  wd = _copy_of(finished_run, tmp_path / 'run')
  flags = ['launch.train', *FINISHED_FLAGS, f'--workdir={wd}']
  reference = finished_run
  losses = _losses(wd)
  corrupt(str(wd / 'checkpoints' / '6'))
  # Step 4 lacks Orbax's optional per-step metadata: Orbax would warn "Metadata file
  # does not exist" (silenced) yet the step is intact.
  os.remove(wd / 'checkpoints' / '4' / '_CHECKPOINT_METADATA')

  r = run_cli(flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr and 'Metadata file does not exist' not in r.stderr, \
      r.stderr[-3000:]
  warning = [l for l in r.stderr.splitlines() if 'checkpoint step 6 was corrupt' in l]
  assert warning and 'resumed from step 4' in warning[0], r.stderr[-3000:]
  moved = os.listdir(wd / 'checkpoints' / 'corrupt')
  assert len(moved) == 1 and moved[0].startswith('6-'), moved  # Kept, not deleted.
  assert json.loads((wd / 'summary.json').read_text())['resumed_from_step'] == 4
  assert assert_bitwise_equal_state(wd, reference) > 10
  assert _losses(wd) == losses
  assert [r['step'] for r in _train_rows(wd)] == list(range(1, 7))  # Each step once.


def test_no_intact_checkpoint_is_one_line_and_nothing_moves(tmp_path, finished_run):
  wd = _copy_of(finished_run, tmp_path / 'run')
  for step in _steps(wd):  # Every step's arrays are garbage.
    for root, _, files in os.walk(wd / 'checkpoints' / str(step) / 'state'):
      for f in files:
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'garbage')
  r = run_cli(['launch.train', *FINISHED_FLAGS, f'--workdir={wd}', '--config.steps=8'])
  assert r.returncode == 1
  line = _last_line(r.stderr)
  assert line.startswith('error: checkpoint step 6') and 'no earlier step is intact' in line, \
      r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert _steps(wd) == [2, 4, 6]  # Nothing moved or deleted.


# --------------------------------------------------------------------------- kill -9


_KILL_FLAGS = ('--config.checkpoint_every=2', '--config.log_every=1', '--config.eval_every=8',
               '--config.model.dropout=0.1', '--config.num_samples=0')


def _start(workdir, steps: int, extra=()) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'launch.train', TINY, f'--workdir={workdir}',
       f'--config.steps={steps}', *_KILL_FLAGS, *extra],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_step(workdir) -> int:
  rows = _train_rows(workdir) if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) else []
  return max((r['step'] for r in rows), default=0)


def _resume_step(workdir) -> int:
  d = os.path.join(workdir, 'checkpoints')
  return max((int(s) for s in os.listdir(d) if s.isdigit()), default=0) if os.path.isdir(d) else 0


def test_sigkill_at_random_moments_resumes_bitwise(tmp_path):
  """kill -9 at random moments, a quarter of them inside a checkpoint save: the final
  checkpoint's arrays are bitwise those of an uninterrupted run, the losses too, and
  metrics.jsonl holds each step exactly once.

  Kills are placed by training progress, not by wall time (the old test broke out
  when a fast machine finished first, then failed its kill count): a process is
  killed after it has logged 1-3 steps beyond the checkpoint it resumed from, and the
  run has enough steps left for every planned kill.
  """
  target = int(os.environ.get('RELIABILITY_KILLS', '6'))
  steps = 6 * target + 8
  t0 = time.time()
  ref = tmp_path / 'reference'
  assert _start(ref, steps).wait(timeout=900) == 0
  t_ref = time.time() - t0

  wd = tmp_path / 'killed'
  rng = random.Random(0)
  kills = mid_save = 0
  t0 = time.time()
  while kills < target:
    resumed = _resume_step(wd)
    assert resumed < steps - 2, f'ran out of steps after {kills} kills'
    if rng.random() < 0.25:  # Kill itself right after starting an (async) save.
      save_step = resumed + 2
      p = _start(wd, steps, [f'--config.debug.sigkill_after_save_step={save_step}'])
      assert p.wait(timeout=900) == -signal.SIGKILL, p.stderr.read()[-2000:]
      mid_save += 1
    else:
      p = _start(wd, steps)
      goal = resumed + rng.randint(1, 3)
      deadline = time.time() + 900
      while p.poll() is None and _logged_step(wd) < goal and time.time() < deadline:
        time.sleep(0.02)
      assert p.poll() is None, f'finished before its kill (step {_logged_step(wd)}/{steps})'
      # Then anywhere within the next step or two, maybe inside a save (at most 2 more
      # steps, so that a fast machine cannot finish the run before the planned kills).
      deadline = time.time() + rng.random() * 0.3
      while time.time() < deadline and _logged_step(wd) < goal + 2:
        time.sleep(0.005)
      p.send_signal(signal.SIGKILL)
      p.wait(timeout=60)
    kills += 1
  p = _start(wd, steps)
  assert p.wait(timeout=900) == 0, p.stderr.read()[-2000:]
  t_killed = time.time() - t0

  rows = _train_rows(wd)
  assert [r['step'] for r in rows] == list(range(1, steps + 1))  # Each step exactly once.
  assert _losses(wd) == _losses(ref)
  arrays = assert_bitwise_equal_state(wd, ref)
  print(f'\nfault injection: {kills} SIGKILLs ({mid_save} inside a save), {steps} steps, '
        f'{arrays} arrays bitwise equal; uninterrupted {t_ref:.0f}s, killed run '
        f'{t_killed:.0f}s in {kills + 1} starts')


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path):
  """Writes fail (file-size limit, as on a full disk): one clear last line, step 3 resumes."""
  import resource
  flags = ['launch.train', TINY, f'--workdir={tmp_path}', '--config.checkpoint_every=3',
           '--config.model.d_model=64', '--config.num_samples=0']
  assert run_cli(flags + ['--config.steps=3']).returncode == 0

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', *flags, '--config.steps=6'], cwd=REPO, env=env,
                     capture_output=True, text=True, preexec_fn=limit_file_size, timeout=600)
  assert r.returncode == 1
  line = _last_line(r.stderr)
  assert line.startswith('error:') and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert 'checkpoint save' in line and 'File too large' in line, line
  assert 'previous checkpoint (step 3) is intact' in line, line
  r = run_cli(flags + ['--config.steps=6'])
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['resumed_from_step'] == 3


# --------------------------------------------------------------------------- quantize


def test_quantize_rerun_on_the_same_workdir_recomputes_in_place(tmp_path, finished_run):
  """The second PTQ run on one workdir used to fail with "Free disk space or fix
  permissions": the export's Orbax step already existed."""
  float_run, ptq_run = _copy_of(finished_run, tmp_path / 'float'), tmp_path / 'ptq'
  cmd = ['launch.quantize', TINY, f'--workdir={ptq_run}', '--config.quant.mode=ptq',
         '--config.quant.weight_bits=8', f'--config.quant.init_from={float_run}']
  losses = []
  for _ in range(2):
    r = run_cli(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    losses.append(json.loads((ptq_run / 'quant_summary.json').read_text())['eval_loss'])
  assert losses[0] == losses[1]
  assert os.listdir(ptq_run / 'export') == ['6']  # The float run's last step.
