"""Plots (research/plots.py, launch.plot_runs): legends outside the axes, no single-point
plots, labels of the varied keys only, tokens on x when batches differ, bars for
non-grid sweeps, distinct colours for 16+ settings. No training: synthetic curves."""

from __future__ import annotations

import json
import os

import pytest
from matplotlib.colors import to_hex

from research import plots
from tests.helpers import run_cli

SCHEDULES = ('cosine', 'linear', 'constant', 'wsd', 'inverse_sqrt', 'rsqrt')
LRS = (1e-3, 3e-3, 1e-2)


def _result(i: int, overrides: dict, *, batch: int = 16, steps: int = 40, seed=None,
            status: str = 'ok', final_shift: float = 0.0) -> dict:
  base = 2.0 + 0.01 * i + final_shift
  train = [(s, base + 1.0 / s) for s in range(5, steps + 1, 5)]
  evals = [(s, base + 1.2 / s) for s in range(10, steps + 1, 10)]
  setting = f'{i:03d}-abcdef'
  return {'name': setting if seed is None else f'{setting}-seed{seed}', 'setting': setting,
          'seed': seed, 'overrides': dict(overrides, **({} if seed is None else {'seed': seed})),
          'status': status, 'train_curve': train, 'eval_curve': evals,
          'tokens_curve': [(s, s * batch * 128) for s, _ in train], 'batch_sizes': [batch],
          'final_eval_loss': evals[-1][1] if status == 'ok' else None}


def _schedules_sweep() -> list[dict]:
  """19 settings, not a grid: 6 schedules x 3 LRs (wsd also sets min_lr_ratio) + 1."""
  out = []
  for sched in SCHEDULES:
    for lr in LRS:
      ov = {'optimizer.schedule': sched, 'optimizer.learning_rate': lr}
      if sched == 'wsd':
        ov['optimizer.min_lr_ratio'] = 0.0
      out.append(_result(len(out), ov))
  out.append(_result(len(out), {'optimizer.schedule': 'cosine', 'optimizer.learning_rate': 3e-3,
                                'optimizer.min_lr_ratio': 0.0}))
  return out


def _grid_sweep_with_seeds() -> list[dict]:
  out = []
  for i, (d, lr) in enumerate((d, lr) for d in (16, 32) for lr in (3e-3, 1e-2)):
    for seed in (0, 1):
      out.append(_result(i, {'model.d_model': d, 'optimizer.learning_rate': lr}, seed=seed,
                         final_shift=0.02 * seed))
  return out


def _data_points(fig) -> int:
  """Points drawn in a figure: line vertices plus bars."""
  ax = fig.axes[0]
  lines = sum(len(line.get_xdata()) for line in ax.get_lines()
              if line.get_label() and not line.get_label().startswith('_child'))
  bars = len([p for p in ax.patches if p.get_width() > 0 and p.get_height() > 0])
  return lines + bars


def _assert_legend_outside(fig) -> None:
  """Legend bbox (figure coords) lies right of the axes bbox: no overlap."""
  fig.canvas.draw()
  ax = fig.axes[0]
  legend = ax.get_legend()
  if legend is None:
    return
  inv = fig.transFigure.inverted()
  lb = legend.get_window_extent().transformed(inv)
  ab = ax.get_window_extent().transformed(inv)
  assert lb.x0 >= ab.x1, (lb, ab)


def _check_all(figs: dict) -> None:
  assert figs
  for name, fig in figs.items():
    _assert_legend_outside(fig)
    assert _data_points(fig) >= 2, name


def test_grid_sweep_with_seeds_short_labels_styles_and_key_plots():
  figs = plots.sweep_figures(_grid_sweep_with_seeds())
  assert sorted(figs) == ['eval_loss.png', 'final_eval_loss.png', 'final_model.d_model.png',
                          'final_optimizer.learning_rate.png', 'train_loss.png']
  _check_all(figs)
  ax = figs['eval_loss.png'].axes[0]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ['d_model=16, learning_rate=0.003 (n=2)', 'd_model=16, learning_rate=0.01 (n=2)',
                    'd_model=32, learning_rate=0.003 (n=2)', 'd_model=32, learning_rate=0.01 (n=2)']
  lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith('_')]
  # Colour for one key, line style for the other.
  assert [ln.get_linestyle() for ln in lines] == ['-', '--', '-', '--']
  cols = [to_hex(ln.get_color()) for ln in lines]
  assert cols[0] == cols[1] != cols[2] == cols[3]
  assert ax.get_xlabel() == 'step'  # Same batch everywhere.
  assert len(ax.collections) == 4  # A ±std band per setting (2 seeds each).
  bars = figs['final_eval_loss.png'].axes[0]
  assert len([p for p in bars.patches if p.get_width() > 0]) == 4


def test_non_grid_sweep_gets_bars_and_16_plus_distinct_colours():
  figs = plots.sweep_figures(_schedules_sweep())
  assert sorted(figs) == ['eval_loss.png', 'final_eval_loss.png', 'train_loss.png']
  _check_all(figs)
  ax = figs['eval_loss.png'].axes[0]
  lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith('_')]
  assert len(lines) == 19
  style = {(to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker()) for ln in lines}
  assert len(style) == 19  # Every setting distinguishable.
  # Three keys vary: line style for min_lr_ratio (2 values), marker for the learning
  # rate (3), colour for the schedule (6).
  assert len({to_hex(ln.get_color()) for ln in lines}) == 6
  assert {ln.get_marker() for ln in lines} == {'o', 's', '^'}
  assert {ln.get_linestyle() for ln in lines} == {'-', '--'}
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels[0] == "schedule=cosine, learning_rate=0.001"
  assert not any('optimizer.' in t for t in labels)
  bars = figs['final_eval_loss.png'].axes[0]
  assert len(bars.get_yticklabels()) == 19


def test_tokens_on_x_when_batch_sizes_differ():
  results = [_result(0, {'batch_size': 32, 'steps': 40}, batch=32),
             _result(1, {'batch_size': 16, 'steps': 80}, batch=16, steps=80),
             _result(2, {'batch_size': 32, 'steps': 40, 'optimizer.grad_accum_steps': 4},
                     batch=32)]
  figs = plots.sweep_figures(results)
  assert sorted(figs) == ['eval_loss.png', 'final_eval_loss.png', 'train_loss.png']
  _check_all(figs)
  ax = figs['eval_loss.png'].axes[0]
  assert ax.get_xlabel() == 'tokens seen'
  ends = sorted(ln.get_xdata()[-1] for ln in ax.get_lines() if not ln.get_label().startswith('_'))
  assert ends == [40 * 32 * 128] * 3  # Equal tokens line up.


def test_no_single_point_plots():
  one_key_value = [_result(0, {'model.d_model': 16, 'seed': 0}),
                   _result(1, {'model.d_model': 16, 'seed': 1})]
  figs = plots.sweep_figures([dict(r, setting=r['name']) for r in one_key_value])
  assert 'final_model.d_model.png' not in figs and 'final_seed.png' not in figs
  single = _result(0, {'model.d_model': 16})
  single['eval_curve'] = single['eval_curve'][-1:]
  single['train_curve'] = single['train_curve'][-1:]
  figs = plots.sweep_figures([single, dict(single, name='x', setting='x', status='failed',
                                           final_eval_loss=None)])
  assert figs == {}  # One point per run and one finished setting: nothing to draw.


def test_failed_runs_are_left_out_of_final_plots():
  results = [_result(i, {'model.d_model': d}) for i, d in enumerate((16, 32, 64))]
  results.append(_result(3, {'model.num_kv_heads': 3}, status='failed'))
  results[-1]['eval_curve'] = []
  results[-1]['train_curve'] = []
  figs = plots.sweep_figures(results)
  assert sorted(figs) == ['eval_loss.png', 'final_eval_loss.png', 'final_model.d_model.png',
                          'train_loss.png']
  _check_all(figs)


def _fake_run_dir(path, *, lr: float, batch: int, shift: float) -> None:
  os.makedirs(path)
  cfg = {'config': {'seed': 0, 'batch_size': batch, 'optimizer': {'learning_rate': lr},
                    'model': {'d_model': 64}, 'data': {'path': str(path)}}}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for s in range(10, 60, 10):
      f.write(json.dumps({'step': s, 'split': 'train', 'loss': 3 + shift - s / 100,
                          'batch_size': batch, 'tokens_seen': s * batch * 64}) + '\n')
      f.write(json.dumps({'step': s, 'split': 'eval', 'loss': 3.1 + shift - s / 100}) + '\n')


def test_plot_runs_command(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  _fake_run_dir(a, lr=1e-3, batch=16, shift=0.0)
  _fake_run_dir(b, lr=3e-3, batch=32, shift=0.2)
  out = run_cli(['launch.plot_runs', str(a), str(b), f'--out={tmp_path}/cmp'], timeout=120)
  assert out.returncode == 0, out.stderr
  assert sorted(os.listdir(tmp_path / 'cmp')) == ['eval_loss.png', 'final_eval_loss.png']
  assert f'{a}: batch_size=16, learning_rate=0.001: last eval loss 2.6000 at step 50' in out.stdout
  series = plots.run_series([str(a), str(b)], 'loss', 'train')
  figs = plots.run_figures(series, 'loss', 'train')
  _check_all(figs)
  assert figs['train_loss.png'].axes[0].get_xlabel() == 'tokens seen'
  bad = run_cli(['launch.plot_runs', str(tmp_path), f'--out={tmp_path}/x'], timeout=120)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path} has no metrics.jsonl')


def test_one_key_with_18_values_gets_18_colours():
  figs = plots.sweep_figures([_result(i, {'model.d_model': 8 * (i + 1)}) for i in range(18)])
  _check_all(figs)
  lines = [ln for ln in figs['eval_loss.png'].axes[0].get_lines()
           if not ln.get_label().startswith('_')]
  assert len({to_hex(ln.get_color()) for ln in lines}) == 18


@pytest.mark.parametrize('n', [3, 12, 25])
def test_colours_are_distinct(n):
  assert len({to_hex(c) for c in plots.colours(n)}) == n
