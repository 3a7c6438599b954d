"""Every user error ends in ONE line on stderr, the last one; details go to the log file."""

from __future__ import annotations

import sys

import pytest
from absl import flags
from ml_collections import config_flags

from research import runtime
from tests.helpers import run_cli

TINY = '--config=experiments/pretrain/tiny.py:smoke=True'


def _one_error_line(r, *needles: str) -> str:
  """stderr's last line is the error, no traceback anywhere on stderr."""
  assert r.returncode == 1, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert lines and lines[-1].startswith('error: '), r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert sum(l.startswith('error:') for l in lines) == 1, r.stderr[-3000:]
  for n in needles:
    assert n in lines[-1], lines[-1]
  return lines[-1]


@pytest.mark.parametrize('config, needles', [
    ('{tmp}/syntax.py', ('syntax error in', 'syntax.py, line 1')),
    ('{tmp}/missing.py', ('missing.py',)),
    ('experiments/pretrain/tiny.py:smoke=True,bogus=1', ("config arg 'bogus' is unknown",)),
    ('experiments/pretrain/tiny.py:smoke=maybe', ("'smoke' must be True or False",)),
])
def test_config_file_errors_are_one_line(tmp_path, config, needles):
  (tmp_path / 'syntax.py').write_text('def get_config(:\n')
  r = run_cli(['launch.train', f'--config={config.format(tmp=tmp_path)}',
               f'--workdir={tmp_path / "run"}'])
  line = _one_error_line(r, *needles)
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # Nothing but the error.
  assert 'ml_collections' not in line and 'absl' not in line, line


def test_nan_stop_error_is_the_last_line_and_the_details_are_in_the_log(tmp_path):
  """lr=1e6 dies on a NaN while an async checkpoint save is still running: before the
  fix, ~150 lines of Orbax/asyncio shutdown tracebacks followed the error line."""
  wd = tmp_path / 'run'
  r = run_cli(['launch.train', TINY, f'--workdir={wd}', '--config.optimizer.learning_rate=1e6',
               '--config.checkpoint_every=1', '--config.log_every=1'])
  _one_error_line(r, 'non-finite loss/gradients at step')
  log = (wd / 'train.log').read_text()
  assert log.startswith('===== attempt started') and 'python -m launch.train' in log.splitlines()[0]
  assert 'Traceback' in log and 'NonFiniteError' in log  # The details went here.
  assert r.stderr.strip().splitlines()[-1] in log


def test_model_size_mismatch_on_resume_is_the_last_line(tmp_path):
  wd = tmp_path / 'run'
  base = ['launch.train', TINY, f'--workdir={wd}', '--config.num_samples=0']
  assert run_cli(base + ['--config.steps=2']).returncode == 0
  r = run_cli(base + ['--config.steps=4', '--config.model.d_model=48'])
  line = _one_error_line(r)
  # Orbax's shape check or the resume fingerprint (research/resume_check.py), whichever
  # comes first.
  assert 'does not match this model/config' in line or 'd_model' in line, line
  # One header per attempt, appended.
  assert (wd / 'train.log').read_text().count('===== attempt started') == 2


def _fresh_flags():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'w', flag_values=fv)
  return fv


@pytest.mark.parametrize('argv, needle', [
    (['--config=experiments/pretrain/tiny.py:nope=1'], "config arg 'nope' is unknown"),
    (['--config=experiments/pretrain/tiny.py', '--config.steps=abc'], 'steps'),
    (['--config=experiments/pretrain/tiny.py', '--config.no_such_key=1'],
     "unknown config key 'no_such_key'"),
    (['--config=/nonexistent/x.py'], 'no such config file'),
    (['--bogus_flag=1'], 'bogus_flag'),
])
def test_parse_flags_raises_one_line_flag_errors(argv, needle):
  with pytest.raises(runtime.FlagError) as e:
    runtime.parse_flags(['prog', *argv], _fresh_flags())
  text = str(e.value)
  assert '\n' not in text and 'Traceback' not in text and needle in text, text


def test_an_internal_error_is_one_line_pointing_at_the_log(tmp_path):
  path = runtime.log_to_file(str(tmp_path), 'train.log')
  try:
    try:
      {}['missing']
    except KeyError as e:
      code, line = runtime.report_exception(e)
  finally:
    runtime.close_log_file()
    sys.unraisablehook = sys.__unraisablehook__
  assert code == runtime.EXIT_ERROR
  assert line.startswith('error: internal error KeyError') and path in line, line
  assert "{}['missing']" in (tmp_path / 'train.log').read_text()  # The full traceback.


def test_user_error_lines_are_one_line():
  code, line = runtime.report_exception(runtime.UserError('a\nmulti-line\n  message'))
  assert (code, line) == (runtime.EXIT_ERROR, 'error: a multi-line message')
