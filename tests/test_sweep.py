"""launch.sweep: naming, planning, tables with seeds, --dry_run, and a real smoke sweep.

The end-to-end test runs tests/sweep_config.py:bad=True (4 smoke settings plus one
entry the trainer rejects) in two steps, --only=0,1 first and then everything, to
check that finished runs are skipped, missing ones run, and a failure is tabulated
while the others finish.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import statistics

import pytest

from research import sweep
from tests.helpers import run_cli

CONFIG = 'tests/sweep_config.py'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
QUOTED = """--config.sample_prompt=it's "a b" $(echo no) ; x"""


def _csv(path: str) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _assert_png(path: str) -> None:
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC, path
  from matplotlib import image
  assert image.imread(path).ndim == 3


# ---------------------------------------------------------------------------------
# Unit tests (no training).


def test_run_names_are_short_stable_and_mapped_to_settings():
  a = sweep.run_name(3, {'model.d_model': 64, 'optimizer.learning_rate': 1e-3})
  assert re.fullmatch(r'003-[0-9a-f]{6}', a), a
  assert a == sweep.run_name(3, {'model.d_model': 64, 'optimizer.learning_rate': 1e-3})
  assert a != sweep.run_name(3, {'model.d_model': 64, 'optimizer.learning_rate': 2e-3})
  assert sweep.run_name(3, {'k': 1}, seed=2).endswith('-seed2')
  assert sweep.run_name(1234, {}, width=4).startswith('1234-')
  long = {f'k{i}': 'v' * 20 for i in range(10)}  # Was a 120-character name.
  assert len(sweep.run_name(7, long)) == 10
  assert sweep.run_name(0, {'optimizer.lr_multipliers': (('embed', 0.1),)}) != \
      sweep.run_name(0, {'optimizer.lr_multipliers': (('embed', 0.2),)})
  assert (sweep.label({'model.d_model': 64, 'optimizer.learning_rate': 1e-3}) ==
          'model.d_model=64,optimizer.learning_rate=0.001')
  assert sweep.label({}) == 'base'


def test_names_survive_an_inserted_entry_and_siblings_are_referenced(tmp_path):
  """A rerun after sweep() gained an entry keeps every planned run's directory, and an
  override naming another entry's label points at that run's directory."""
  cfg = tmp_path / 'cfg.py'
  body = ('from tests import sweep_config\n'
          'get_config = sweep_config.get_config\n'
          'def sweep():\n  return [{}]\n')
  cfg.write_text(body.format("{'name': 'float'}, {'model.d_model': 16}"))
  first = sweep.make_plan(str(cfg), str(tmp_path / 's'))
  sweep.write_plan(first, str(tmp_path / 's'))
  cfg.write_text(body.format("{'name': 'float'}, {'name': 'new'}, {'model.d_model': 16}, "
                             "{'data.path': 'name=float'}"))
  second = sweep.make_plan(str(cfg), str(tmp_path / 's'))
  names = [r.name for r in second.runs]
  assert names[0] == first.runs[0].name and names[2] == first.runs[1].name
  assert names[1].startswith('001-') and len(set(names)) == 4
  assert second.runs[3].overrides == {'data.path': names[0]}
  assert second.runs[3].label == 'data.path=name=float'
  seeded = sweep.make_plan(str(cfg), str(tmp_path / 't'), seeds=[0, 1])
  assert seeded.runs[7].overrides == {'data.path': seeded.runs[1].name, 'seed': 1}
  assert seeded.runs[1].name == seeded.runs[0].setting + '-seed1'


def test_parse_seeds_and_select():
  assert sweep.parse_seeds('') is None
  assert sweep.parse_seeds('3') == [0, 1, 2]
  assert sweep.parse_seeds('0,5,7') == [0, 5, 7]
  for bad in ('0', 'x', '1,1'):
    with pytest.raises(sweep.SweepError):
      sweep.parse_seeds(bad)
  runs = [sweep.Run(i, f'00{i}-abcdef', f'00{i}-abcdef', {}, None, '/x', [], label=n)
          for i, n in enumerate(['a=1', 'a=2', 'a=3', 'b=10'])]
  labels = lambda rs: [r.label for r in rs]
  assert labels(sweep.select(runs, [])) == labels(runs)
  assert labels(sweep.select(runs, ['0,2'])) == ['a=1', 'a=3']
  assert labels(sweep.select(runs, ['1-2', 'b='])) == ['a=2', 'a=3', 'b=10']
  assert labels(sweep.select(runs, ['a=1'])) == ['a=1']
  assert labels(sweep.select(runs, ['003-abc'])) == ['b=10']  # A directory name.
  for bad in (['7'], ['zzz'], ['2-1']):
    with pytest.raises(sweep.SweepError):
      sweep.select(runs, bad)


def test_command_is_an_argv_and_round_trips_through_commands_txt(tmp_path):
  plan = sweep.make_plan(f'{CONFIG}:bad=True', str(tmp_path), extra_args=[QUOTED],
                         python='python')
  assert plan.runs[-1].label == 'model.num_kv_heads=3'
  assert plan.keys == ['model.d_model', 'optimizer.learning_rate', 'model.num_kv_heads']
  r = plan.runs[1]
  assert r.label == 'model.d_model=16,optimizer.learning_rate=0.01'
  assert r.command == [
      'python', '-m', 'launch.train', f'--config={CONFIG}:bad=True',
      f'--workdir={tmp_path}/{r.name}',
      '--config.model.d_model=16', '--config.optimizer.learning_rate=0.01', QUOTED]
  sweep.write_plan(plan, str(tmp_path))
  lines = (tmp_path / 'commands.txt').read_text().splitlines()
  assert [shlex.split(ln) for ln in lines] == [r.command for r in plan.runs]
  assert sweep.read_plan(str(tmp_path)) == plan


def test_dry_run_prints_plan_and_runs_nothing(tmp_path):
  out = run_cli(['launch.sweep', f'--config={CONFIG}', f'--workdir={tmp_path}', '--dry_run',
                 '--seeds=2', '--only=d_model=16', '--', QUOTED], timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'sweep of tests/sweep_config.py: 4 of 8 runs selected, 0 done, 4 to run' in out.stdout
  listed = re.findall(r'^\s+(\d+)\s+new\s+(\S+)\s+(\S+)$', out.stdout, flags=re.M)
  plan = json.loads((tmp_path / 'sweep.json').read_text())
  assert [(i, n) for i, n, _ in listed] == [(str(i), plan['runs'][i]['name']) for i in range(4)]
  assert [x[2] for x in listed] == ['model.d_model=16,optimizer.learning_rate=0.003,seed=0',
                                    'model.d_model=16,optimizer.learning_rate=0.003,seed=1',
                                    'model.d_model=16,optimizer.learning_rate=0.01,seed=0',
                                    'model.d_model=16,optimizer.learning_rate=0.01,seed=1']
  assert re.fullmatch(r'000-[0-9a-f]{6}-seed1', plan['runs'][1]['name'])
  assert len(plan['runs']) == 8 and plan['seeds'] == [0, 1]
  assert plan['runs'][1]['overrides'] == {'model.d_model': 16,
                                          'optimizer.learning_rate': 0.003, 'seed': 1}
  lines = (tmp_path / 'commands.txt').read_text().splitlines()
  assert len(lines) == 8
  assert shlex.join(plan['runs'][3]['command']) in out.stdout
  assert shlex.split(lines[3])[-2:] == ['--config.seed=1', QUOTED]
  assert sorted(os.listdir(tmp_path)) == ['commands.txt', 'sweep.json']  # No run dirs.


@pytest.mark.parametrize('args, needle', [
    (['--', '--config.model.d_modle=3'], "config key 'model.d_modle' is unknown"),
    (['--', '--config.model.d_model=3'], 'also set by the sweep'),
    (['--seeds=2', '--', '--config.seed=1'], '(--seeds)'),
    (['--only=nomatch'], "--only='nomatch' matches no run"),
    (['--config.steps=3'], 'trainer overrides go after --'),
])
def test_bad_invocations_fail_with_one_line(tmp_path, args, needle):
  out = run_cli(['launch.sweep', f'--config={CONFIG}', f'--workdir={tmp_path}', '--dry_run',
                 *args], timeout=120)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and needle in last, out.stderr


def test_bad_sweep_entry_fails_before_any_run(tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text('from tests import sweep_config\n'
                 'get_config = sweep_config.get_config\n'
                 "def sweep():\n  return [{'model.d_model': 16}, {'model.d_modle': 3}]\n")
  out = run_cli(['launch.sweep', f'--config={cfg}', f'--workdir={tmp_path}/s'], timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().startswith("error: sweep() entry 1: config key 'model.d_modle'")
  assert not os.path.exists(tmp_path / 's')


def _fake_run(run: sweep.Run, eval_losses: list[float], train_loss: float) -> None:
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
    for i, v in enumerate(eval_losses):
      f.write(json.dumps({'step': 2 * i + 2, 'split': 'train', 'loss': v + 0.1}) + '\n')
      f.write(json.dumps({'step': 2 * i + 2, 'split': 'eval', 'loss': v}) + '\n')
    f.write('{"step": 99, "spl')  # A torn last line (killed mid-write) is ignored.
  with open(os.path.join(run.workdir, 'summary.json'), 'w') as f:
    json.dump({'final_train_loss': train_loss, 'final_eval_loss': eval_losses[-1],
               'tokens_seen': 1024, 'wall_time_s': 2.0, 'steps': 4, 'param_count': 100}, f)


def test_table_with_seeds_has_mean_and_std(tmp_path):
  plan = sweep.make_plan(CONFIG, str(tmp_path), seeds=[0, 1, 2])
  sweep.write_plan(plan, str(tmp_path))
  by = {(r.label, r.seed): r for r in plan.runs}
  s0 = 'model.d_model=16,optimizer.learning_rate=0.003'
  finals = [5.0, 5.2, 5.6]
  for seed, v in enumerate(finals):
    _fake_run(by[s0, seed], [v + 0.5, v], train_loss=v - 0.1)
  s1 = 'model.d_model=16,optimizer.learning_rate=0.01'
  _fake_run(by[s1, 0], [4.0, 4.5], train_loss=4.2)  # Best eval is not the final.
  _fake_run(by[s1, 1], [4.2, 4.1], train_loss=4.2)
  failed = by[s1, 2]
  os.makedirs(failed.workdir)
  sweep.write_status(failed, status='failed', returncode=1, error='boom')

  sweep.collect(str(tmp_path), plots=True)
  rows = _csv(tmp_path / 'results.csv')
  assert [r['name'] for r in rows] == [r.setting for r in plan.runs[::3]]
  r0, r1, r2 = rows[0], rows[1], rows[2]
  assert r0['seeds'] == '0 1 2' and r0['n_ok'] == '3' and r0['status'] == 'ok'
  assert r0['model.d_model'] == '16' and r0['optimizer.learning_rate'] == '0.003'
  assert float(r0['final_eval_loss']) == pytest.approx(statistics.fmean(finals))
  assert float(r0['final_eval_loss_std']) == pytest.approx(statistics.stdev(finals))
  assert float(r0['final_train_loss']) == pytest.approx(statistics.fmean(finals) - 0.1)
  assert r1['n_ok'] == '2' and r1['status'] == 'ok 2/3, failed 1/3'
  assert float(r1['best_eval_loss']) == pytest.approx(4.05)  # Mean of per-run minima.
  assert float(r1['final_eval_loss']) == pytest.approx(4.3)
  assert r1['error'] == 'seed=2: boom'
  assert r2['status'] == 'pending 3/3' and r2['final_eval_loss'] == ''
  md = (tmp_path / 'results.md').read_text()
  assert f'| {by[s0, 0].setting} | `16` | `0.003` | 0 1 2 | 3 | ok | ' in md
  assert '| name | d_model | learning_rate | seeds | ok runs | status |' in md
  assert f'{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}' in md
  runs = _csv(tmp_path / 'results_runs.csv')
  assert len(runs) == 12 and runs[5]['seed'] == '2' and runs[5]['status'] == 'failed'
  # Only the learning rate varies between finished settings: no final_model.d_model.png.
  assert sorted(p for p in os.listdir(tmp_path) if p.endswith('.png')) == [
      'eval_loss.png', 'final_eval_loss.png', 'final_optimizer.learning_rate.png',
      'train_loss.png']
  for png in ('eval_loss.png', 'final_eval_loss.png', 'final_optimizer.learning_rate.png'):
    _assert_png(tmp_path / png)


# ---------------------------------------------------------------------------------
# End to end: real smoke runs (about a minute on 2 cores).


def test_sweep_runs_resumes_and_reports_failures(tmp_path):
  sweep_dir = tmp_path / 'sweep'
  cmd = ['launch.sweep', f'--config={CONFIG}:bad=True', f'--workdir={sweep_dir}',
         '--parallel=2']
  # Step 1 ("killed" after two runs): only runs 0 and 1.
  out = run_cli([*cmd, '--only=0,1', '--', QUOTED], timeout=400)
  assert out.returncode == 0, out.stdout + out.stderr
  plan = sweep.read_plan(str(sweep_dir))
  names = [r.name for r in plan.runs]
  summaries = [os.path.join(sweep_dir, n, 'summary.json') for n in names]
  assert [os.path.exists(p) for p in summaries] == [True, True, False, False, False]
  mtimes = [os.stat(p).st_mtime_ns for p in summaries[:2]]
  rows = _csv(sweep_dir / 'results.csv')
  assert [r['status'] for r in rows] == ['ok', 'ok', 'pending', 'pending', 'pending']

  # Step 2: the whole sweep; only the missing runs start, the bad one fails.
  out = run_cli([*cmd, '--', QUOTED], timeout=400)
  assert out.returncode == 1, out.stdout + out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith('error: 1 of 5 runs not ok')
  for n in names[:2]:
    assert f'done already: {n}' in out.stdout and f'start 1/3: {n}' not in out.stdout
  assert [os.stat(p).st_mtime_ns for p in summaries[:2]] == mtimes  # Not rerun.
  assert all(os.path.exists(p) for p in summaries[:4])

  rows = _csv(sweep_dir / 'results.csv')
  assert list(rows[0]) == ['name', 'model.d_model', 'optimizer.learning_rate',
                           'model.num_kv_heads', 'status', 'final_train_loss',
                           'final_eval_loss', 'best_eval_loss', 'eval_tokens', 'tokens_seen',
                           'wall_time_s', 'steps_done', 'param_count', 'downstream', 'error']
  assert [r['name'] for r in rows] == names
  good, bad = rows[:4], rows[4]
  assert [r['status'] for r in good] == ['ok'] * 4
  for r in good:
    assert 0 < float(r['final_eval_loss']) < 6 and 0 < float(r['final_train_loss']) < 6
    assert float(r['best_eval_loss']) <= float(r['final_eval_loss'])
    assert int(r['eval_tokens']) > 0  # The eval loss's token count.
    assert int(r['tokens_seen']) > 0 and float(r['wall_time_s']) > 0 and r['error'] == ''
  assert [r['model.d_model'] for r in good] == ['16', '16', '32', '32']
  assert bad['status'] == 'failed' and bad['model.num_kv_heads'] == '3'
  assert 'num_kv_heads' in bad['error'] and bad['final_eval_loss'] == ''
  status = json.loads((sweep_dir / names[4] / 'sweep_status.json').read_text())
  assert status['returncode'] == 1 and status['status'] == 'failed'

  md = (sweep_dir / 'results.md').read_text()
  assert '5 runs: 4 ok, 1 failed' in md and '| failed |' in md
  # The failed run's key has no finished value: no final_model.num_kv_heads.png.
  assert sorted(p for p in os.listdir(sweep_dir) if p.endswith('.png')) == [
      'eval_loss.png', 'final_eval_loss.png', 'final_model.d_model.png',
      'final_optimizer.learning_rate.png', 'train_loss.png']
  for png in ('eval_loss.png', 'train_loss.png', 'final_eval_loss.png',
              'final_model.d_model.png', 'final_optimizer.learning_rate.png'):
    _assert_png(sweep_dir / png)
  assert all(len(n) <= 10 for n in names)
  # The quoted extra override reached every trainer unchanged.
  cfg = json.loads((sweep_dir / names[3] / 'config.json').read_text())
  assert cfg['config']['sample_prompt'] == QUOTED.split('=', 1)[1]
  assert cfg['config']['model']['d_model'] == 32

  # --collect_only (after a cluster array job) rebuilds the tables from sweep.json.
  os.remove(sweep_dir / 'results.csv')
  out = run_cli(['launch.sweep', f'--workdir={sweep_dir}', '--collect_only', '--only=d_model'],
                timeout=120)
  assert out.returncode == 0, out.stderr
  assert _csv(sweep_dir / 'results.csv') == rows
