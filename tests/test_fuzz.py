"""Fuzzing the command line: ``--config.KEY=VALUE`` overrides and ``:arg`` strings.

Runs the same path as ``python -m launch.train`` up to (not including) building
anything: absl/ml_collections flag parsing through ``research.runtime.parse_flags``,
then ``research.validation.validate_config``. Whatever the input, the outcome is either
a valid config or a one-line UserError, never a traceback; and a config that passes
is trainable as far as static checks can tell (finite, in-range numbers). The value
checks this found are in research/validation.py (RANGE_CHECKS).
"""

from __future__ import annotations

import math
import sys

import ml_collections
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from research import runtime
from research.validation import validate_config

CONFIG = 'experiments/pretrain/tiny.py'


def _leaves(c: ml_collections.ConfigDict, prefix: str = ''):
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def _keys() -> list[str]:
  from experiments.pretrain import tiny
  return sorted(_leaves(tiny.get_config('smoke=True')))


KEYS = _keys()
TRICKY = ['nan', 'NaN', 'inf', '-inf', '-1', '0', '-0.0', '1e30', '-1e30', '1e400',
          '99999999999999999999', '', "''", 'abc', 'True', 'False', 'None', '[1, 2]',
          '(1,)', '((1, 2),)', "(('x', 'y'),)", '{}', '1.5', '-0.5', '0x10', '1_000',
          '"', "'", '\\', 'é', '🙂', '--', '=', ',', ':']
VALUES = st.one_of(
    st.sampled_from(TRICKY),
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3)
ARGS = st.one_of(
    st.text(alphabet='smoke=TrueFals01,:= x\'"', max_size=20),
    st.lists(st.tuples(st.sampled_from(['smoke', 'Smoke', '', 'x', 'smoke ']),
                       st.sampled_from(['True', 'false', '1', '0', '', 'maybe', '=', 'nan'])),
             max_size=3).map(lambda kv: ','.join(f'{k}={v}' for k, v in kv)),
)


def _fresh_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  return fv


def _parse_and_validate(argv: list[str]) -> ml_collections.ConfigDict | None:
  """The config launch.train would run, or None after a one-line UserError."""
  fv = _fresh_flags()
  saved = sys.argv
  sys.argv = argv  # ml_collections reads --config.KEY overrides from sys.argv.
  try:
    runtime.parse_flags(argv, fv)
    config = ml_collections.ConfigDict(fv.config.to_dict())  # As recipe.run copies it.
    validate_config(config)
    return config
  except runtime.UserError as e:
    text = str(e)
    assert text and '\n' not in text and 'Traceback' not in text, repr(text)
    assert len(text) < 2000, text
    return None
  finally:
    sys.argv = saved


def _floats(c: ml_collections.ConfigDict, prefix: str = ''):
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _floats(v, f'{prefix}{k}.')
    elif isinstance(v, float):
      yield f'{prefix}{k}', v


def _assert_trainable(c: ml_collections.ConfigDict) -> None:
  """Properties of a config that passed: checked independently of validation.py."""
  for key, v in _floats(c):
    assert math.isfinite(v), (key, v)
  o = c.optimizer
  assert o.learning_rate > 0 and o.warmup_steps >= 0 and o.clip_norm >= 0
  assert o.weight_decay >= 0 and 0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0
  assert 0 <= c.model.dropout < 1 and c.model.norm_eps > 0 and c.loss.z_loss >= 0
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints'):
    assert isinstance(c[key], int) and not isinstance(c[key], bool) and c[key] > 0, key
  assert c.eval_steps >= 0 and c.num_samples >= 0


_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(OVERRIDES)
def test_config_overrides_never_end_in_a_traceback(overrides):
  argv = ['launch.train', f'--config={CONFIG}:smoke=True', '--workdir=/tmp/unused'] + [
      f'--config.{k}={v}' for k, v in overrides]
  config = _parse_and_validate(argv)
  if config is not None:
    _assert_trainable(config)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(ARGS)
def test_config_args_never_end_in_a_traceback(arg):
  config = _parse_and_validate(['launch.train', f'--config={CONFIG}:{arg}'])
  if config is not None:
    _assert_trainable(config)


@pytest.mark.parametrize('key, value', [
    ('optimizer.learning_rate', 'nan'), ('optimizer.learning_rate', 'inf'),
    ('optimizer.learning_rate', '-1'), ('optimizer.warmup_steps', '-1'),
    ('optimizer.b2', '1.0'), ('optimizer.clip_norm', '-1.0'), ('model.dropout', '1.0'),
    ('optimizer.lr_multipliers', '1.5'), ('finetune.pretrain_overrides', '-1'),
    ('steps', '0'), ('seq_len', 'abc'),
])
def test_known_bad_values_are_one_line_errors_naming_the_key(key, value):
  fv = _fresh_flags()
  argv = ['launch.train', f'--config={CONFIG}:smoke=True', f'--config.{key}={value}']
  saved, sys.argv = sys.argv, argv
  try:
    with pytest.raises(runtime.UserError) as e:
      runtime.parse_flags(argv, fv)
      validate_config(ml_collections.ConfigDict(fv.config.to_dict()))
  finally:
    sys.argv = saved
  assert key.split('.')[-1] in str(e.value) and '\n' not in str(e.value), str(e.value)
