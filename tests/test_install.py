"""The package installs and runs outside the repository (pyproject.toml, console commands,
short config names): a venv, a non-editable install, then train, eval and generate from
another directory.

The venv sees the system's site-packages (jax etc. are not downloaded again) and the
install is ``--no-deps --no-build-isolation --no-index``, so nothing is fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from research import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('research-train', 'research-sweep', 'research-eval', 'research-generate',
            'research-plan', 'research-benchmark', 'research-plot-runs')


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return env


def _run(argv, cwd, timeout=300) -> subprocess.CompletedProcess:
  out = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, f'{argv}: {out.stdout[-2000:]}{out.stderr[-3000:]}'
  return out


def test_installed_package_trains_from_another_directory(tmp_path):
  src = tmp_path / 'src'
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for d in ('research', 'launch', 'experiments'):
    shutil.copytree(os.path.join(REPO, d), src / d, ignore=ignore)
  for f in ('pyproject.toml', 'requirements.txt', 'README.md'):
    shutil.copy(os.path.join(REPO, f), src / f)
  venv = tmp_path / 'venv'
  # --without-pip: the system pip and setuptools (seen through the system site-packages)
  # install into the venv; the venv's own bundled setuptools could not build a wheel.
  _run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)],
       tmp_path)
  py = str(venv / 'bin' / 'python')
  _run([py, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index',
        str(src)], tmp_path)
  shutil.rmtree(src)  # A plain install must not need the source tree afterwards.
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  where = _run([py, '-c', 'import research, launch, experiments; print(research.__file__)'],
               elsewhere).stdout.strip()
  assert where.startswith(str(venv)), where  # The installed copy, not the checkout.
  for cmd in COMMANDS:
    assert (venv / 'bin' / cmd).exists(), cmd

  # The README's path and a short name both resolve to the installed config.
  plan = _run([str(venv / 'bin' / 'research-sweep'),
               '--config=experiments/pretrain/tiny.py:smoke=True', '--workdir=sw',
               '--dry_run'], elsewhere)
  assert '3 of 3 runs selected' in plan.stdout, plan.stdout
  workdir = elsewhere / 'run'
  _run([str(venv / 'bin' / 'research-train'), '--config=tiny:smoke=True',
        f'--workdir={workdir}', '--config.num_samples=0'], elsewhere)
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 6 and 0 < summary['final_eval_loss'] < 6
  config = json.loads((workdir / 'config.json').read_text())
  assert config['config']['name'] == 'tiny' and config['config']['steps'] == 6
  rows = [json.loads(ln) for ln in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [3, 6]
  assert os.listdir(workdir / 'checkpoints')
  # The daily loop continues with the installed eval and generate commands.
  ev = json.loads(_run([str(venv / 'bin' / 'research-eval'), f'--run={workdir}',
                        '--eval_tokens=2000'], elsewhere).stdout)
  assert ev['step'] == 6 and ev['num_tokens'] == 2000 and 0 < ev['loss'] < 6, ev
  gen = _run([str(venv / 'bin' / 'research-generate'), f'--run={workdir}',
              '--prompt=def f(', '--max_new_tokens=8', '--greedy'], elsewhere)
  line = json.loads(gen.stdout.strip().splitlines()[-1])
  assert line['prompt'] == 'def f(' and isinstance(line['completion'], str), line


def test_short_config_names(tmp_path, monkeypatch):
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')  # Not the repository: its files would win over names.
  root = tmp_path / 'pkg' / 'experiments'
  for rel in ('pretrain/tiny.py', 'qat/tiny.py', 'pretrain/small.py', 'common.py'):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text('def get_config(arg=None):\n  pass\n'
                            if rel != 'common.py' else 'X = 1\n')
  assert config_files.shipped_configs(str(root)) == ('pretrain/small', 'pretrain/tiny',
                                                      'qat/tiny')
  want = str(root / 'pretrain' / 'small.py')
  for name in ('small', 'pretrain/small', 'experiments/pretrain/small.py', 'small.py'):
    assert config_files.resolve(f'{name}:smoke=True', str(root)) == f'{want}:smoke=True'
  assert config_files.resolve('qat/tiny', str(root)) == str(root / 'qat' / 'tiny.py')
  with pytest.raises(config_files.ConfigFileError,
                     match=r"'tiny' is ambiguous; candidates: pretrain/tiny, qat/tiny"):
    config_files.resolve('tiny', str(root))
  with pytest.raises(config_files.ConfigFileError, match='no shipped config of that name'):
    config_files.resolve('common', str(root))  # No get_config: not a config.
  existing = tmp_path / 'mine.py'
  existing.write_text('')
  assert config_files.resolve(f'{existing}:a=1', str(root)) == f'{existing}:a=1'  # A file wins.
  # The real package: the default config by its short name.
  assert config_files.resolve('tiny').endswith(os.path.join('experiments', 'pretrain',
                                                             'tiny.py'))


def test_train_flag_takes_a_short_name_and_names_a_bad_one(tmp_path):
  from tests.helpers import run_cli
  out = run_cli(['launch.train', '--config=tny', f'--workdir={tmp_path}'], timeout=120)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and "no file 'tny' and no shipped config" in last, last
  assert 'pretrain/tiny' in last
