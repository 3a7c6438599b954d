"""Per-process reading and resuming on another process count (the global data order).

* In-process: with the token store, process p of P reads (from the memmaps) exactly
  its rows of each global batch, and the processes' rows are disjoint with the
  1-process batch as their union.
* Real processes (``launch.local`` on 127.0.0.1, as tests/test_distributed.py): a run of
  tiny.py:smoke=True stopped after step 10 under 2 processes resumes under 1 and under 4
  processes with the losses of an uninterrupted run (one process, 8 devices: the pytest
  process, conftest.py's reference_losses). The stop is deterministic: the
  first run has ``steps=10`` and the resumed ones ``steps=20``, with
  ``optimizer.decay_steps=20`` in all, so the LR schedule does not depend on ``steps``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from research.config import base_config
from research.data import pipeline, token_store, tokenizers
from tests.helpers import MULTI_PROCESS_RUN, REPO, train_losses, suite_xla_flags

BYTES = tokenizers.ByteTokenizer()


@pytest.fixture
def stdlib_cfg(tmp_path, monkeypatch):
  monkeypatch.setenv('RESEARCH_DATA_CACHE', str(tmp_path / 'cache'))
  c = base_config()
  c.seq_len, c.batch_size = 32, 8
  return c


def test_processes_read_only_their_rows_and_union_is_the_global_batch(stdlib_cfg, monkeypatch):
  c = stdlib_cfg
  reads: list[np.ndarray] = []
  windows = token_store.SplitStore.windows

  def counting_windows(self, starts, length):
    reads.append(np.asarray(starts))
    return windows(self, starts, length)

  monkeypatch.setattr(token_store.SplitStore, 'windows', counting_windows)
  it = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=8)
  one, one_reads = [], []
  for _ in range(3):
    reads.clear()
    one.append(next(it))
    [r] = reads
    one_reads.append(r)
  for count in (2, 4):
    rows = 8 // count
    its = [pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=rows,
                                     process_index=p, process_count=count)
           for p in range(count)]
    for g, g_reads in zip(one, one_reads):
      parts = []
      for p, it in enumerate(its):
        reads.clear()
        parts.append(next(it))
        # Only this process's rows were read: its B/P windows of the global batch.
        [r] = reads
        np.testing.assert_array_equal(r, g_reads[p * rows:(p + 1) * rows])
      for k in g:
        np.testing.assert_array_equal(g[k], np.concatenate([b[k] for b in parts]))
      assert len(set(g_reads.tolist())) == 8  # Disjoint rows.


def test_global_state_is_the_same_on_every_process(stdlib_cfg):
  c = stdlib_cfg
  its = [pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=4,
                                   process_index=p, process_count=2) for p in range(2)]
  for it in its:
    for _ in range(5):
      next(it)
  assert its[0].get_state() == its[1].get_state() and its[0].global_state
  # A 1-process iterator restored from that state continues with the same global batch.
  one = pipeline.make_lm_iterator(c, BYTES, 'train', batch_size_per_process=8)
  one.set_state(json.loads(json.dumps(its[0].get_state())))
  nxt = [next(it) for it in its]
  np.testing.assert_array_equal(next(one)['inputs'],
                                np.concatenate([b['inputs'] for b in nxt]))


# ------------------------------------------------------------------ real processes

# helpers.MULTI_PROCESS_RUN (its uninterrupted 20 steps: conftest.py's reference_losses,
# one process with 8 devices) with the steps given per run.
FLAGS = ['--config=experiments/pretrain/tiny.py:smoke=True', '--config.optimizer.decay_steps=20',
         *[f'--config.{k}={v}' for k, v in MULTI_PROCESS_RUN.items() if k != 'steps']]


def _local(n: int, devices: int, workdir, steps: int, env) -> str:
  cmd = [sys.executable, '-m', 'launch.local', f'--num_processes={n}',
         f'--devices_per_process={devices}', '--', *FLAGS, f'--config.steps={steps}',
         f'--workdir={workdir}']
  r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-5000:]
  return r.stdout


def test_stopped_under_2_processes_resumes_under_1_and_4_with_the_same_losses(
    tmp_path, reference_losses):
  env = dict(os.environ)
  env['XLA_FLAGS'] = suite_xla_flags()  # launch.local sets each process's device count.
  env['RESEARCH_DATA_CACHE'] = str(tmp_path / 'cache')
  want = reference_losses  # Uninterrupted, one process.
  assert MULTI_PROCESS_RUN['steps'] == 20 and sorted(want) == list(range(1, 21))

  stopped = tmp_path / 'stopped'
  _local(2, 2, stopped, 10, env)
  got = train_losses(stopped)
  np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)],
                             rtol=1e-5)
  for n, devices in [(1, 2), (4, 1)]:
    wd = tmp_path / f'resumed_{n}'
    shutil.copytree(stopped, wd)
    out = _local(n, devices, wd, 20, env)
    assert 'Resumed from step 10' in out, out[-3000:]
    resumed = train_losses(wd)
    assert sorted(resumed) == list(range(1, 21))
    np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                               [want[s] for s in range(11, 21)], rtol=1e-5,
                               err_msg=f'resumed under {n} process(es)')
    cfg = json.load(open(wd / 'config.json'))
    assert cfg['process_count'] == n


def test_per_process_state_on_another_process_count_is_one_line(tmp_path):
  from research.data import iterator_state
  step = tmp_path / '10'
  (step / 'data').mkdir(parents=True)
  for p in range(2):
    (step / 'data' / f'process_{p}-of-2.json').write_text('{"next_index": 3}')

  class PerProcess:  # A tfds stream's iterator: its state is its own.
    pass

  with pytest.raises(iterator_state.DataStateError) as e:
    iterator_state.restore_items(str(step), PerProcess(), 0, 1)
  msg = str(e.value)
  assert '\n' not in msg and 'saved by 2 process(es)' in msg and 'launch.prepare_data' in msg
  assert 'data' in iterator_state.restore_items(str(step), PerProcess(), 1, 2)

  class Global:
    global_state = True
    state = None

    def set_state(self, s):
      self.state = s

  g = Global()
  assert iterator_state.restore_items(str(step), g, 0, 4) == {}
  iterator_state.restore_global(str(step), g)
  assert g.state == {'next_index': 3}
