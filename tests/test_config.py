"""Config parsing, overrides and schema checks."""

import pytest

from research.config import ConfigError, base_config, check_known_keys, override, parse_arg


def test_parse_arg_types():
  a = parse_arg('smoke=True,size=1b,n=3,lr=0.5', smoke=False, size='124m', n=1, lr=1.0)
  assert a.smoke is True and a.size == '1b' and a.n == 3 and a.lr == 0.5
  assert parse_arg('smoke', smoke=False).smoke is True
  assert parse_arg(None, smoke=False).smoke is False


def test_parse_arg_errors_name_the_key():
  with pytest.raises(ConfigError, match="'smok'"):
    parse_arg('smok=True', smoke=False)
  with pytest.raises(ConfigError, match="'n' must be int"):
    parse_arg('n=x', n=1)


def test_override_and_unknown_keys():
  c = base_config()
  override(c, {'model.d_model': 64, 'steps': 3})
  assert c.model.d_model == 64 and c.steps == 3
  with pytest.raises(ConfigError, match='model.d_modle'):
    override(c, {'model.d_modle': 1})
  with pytest.raises(ConfigError, match="no section 'modle'"):
    override(c, {'modle.d_model': 1})
  c2 = base_config()
  c2.unlock() if hasattr(c2, 'unlock') else None
  c2.extra_key = 1
  with pytest.raises(ConfigError, match="'extra_key' is unknown"):
    check_known_keys(c2)


def test_every_experiment_config_loads_and_validates():
  import glob
  import importlib
  from research.validation import validate_config
  files = sorted(glob.glob('experiments/**/*.py', recursive=True))
  configs = [f for f in files if not f.endswith('__init__.py') and 'common' not in f]
  assert configs
  import tensorflow_datasets as tfds
  # Validation opens the data sources too; TFDS datasets (glue/sst2, imdb) need the
  # network to prepare, so they are mocked here as in the other TFDS tests.
  with tfds.testing.mock_data(num_examples=8):
    for path in configs:
      mod = importlib.import_module(path[:-3].replace('/', '.'))
      for arg in ('', 'smoke=True'):
        c = mod.get_config(arg)
        validate_config(c)
        assert isinstance(mod.sweep(), list)
