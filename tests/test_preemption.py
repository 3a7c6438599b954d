"""SIGTERM finishes the step, saves a checkpoint and exits with the documented code."""

import os
import signal
import subprocess
import sys
import time

from research.runtime import EXIT_PREEMPTED
from tests.helpers import REPO


def test_sigterm_saves_and_exits_75(tmp_path):
  wd = tmp_path / 'run'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'launch.train', '--config=experiments/pretrain/tiny.py:smoke=True',
       f'--workdir={wd}', '--config.steps=100000', '--config.checkpoint_every=100000',
       '--config.eval_every=100000', '--config.log_every=1'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = wd / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
    time.sleep(0.5)
  assert metrics.exists(), 'training never started'
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
  steps = [int(s) for s in os.listdir(wd / 'checkpoints') if s.isdigit()]
  assert len(steps) == 1 and steps[0] > 0
  # The preemption note is the last line (nothing of Orbax's shutdown after it), and
  # the attempt's log records it.
  last = out.strip().splitlines()[-1]
  assert last == f'preempted: saved a checkpoint at step {steps[0]}; rerun to resume.', out[-3000:]
  assert last in (wd / 'train.log').read_text()
