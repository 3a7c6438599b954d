"""Sweep plots (matplotlib, Agg canvas; no pyplot state): loss curves, final loss per key.

Input is the per-run results of :func:`research.sweep.collect` (dicts with ``name``,
``setting``, ``seed``, ``overrides``, ``status``, ``train_curve``, ``eval_curve`` and
``final_eval_loss``).
"""

from __future__ import annotations

import os
import re
import statistics
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, format='png')


def _no_data(ax: Any, text: str) -> None:
  ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes)


def key_filename(key: str) -> str:
  """``final_<key>.png`` with the key made filesystem-safe (``final_model.d_model.png``)."""
  return f'final_{re.sub(r"[^A-Za-z0-9._-]", "_", key)}.png'


def plot_curves(results: Sequence[Mapping[str, Any]], split: str, path: str) -> None:
  """One line per run (runs of one setting share a colour); x = step, y = loss."""
  fig, ax = _figure()
  colours: dict[str, Any] = {}
  cycle = [f'C{i}' for i in range(10)]
  drawn = 0
  for r in results:
    pts = r[f'{split}_curve']
    if not pts:
      continue
    first = r['setting'] not in colours
    colour = colours.setdefault(r['setting'], cycle[len(colours) % len(cycle)])
    style = '-' if r['status'] == 'ok' else ':'
    ax.plot([s for s, _ in pts], [v for _, v in pts], style, color=colour,
            marker='o' if len(pts) < 20 else None, markersize=3,
            label=r['setting'] if first else None)
    drawn += 1
  if drawn:
    ax.legend(fontsize='x-small' if len(colours) > 6 else 'small', loc='best')
  else:
    _no_data(ax, f'no {split} rows in any metrics.jsonl yet')
  ax.set_xlabel('step')
  ax.set_ylabel(f'{split} loss')
  ax.set_title(f'{split} loss per run (dotted: run not finished ok)')
  ax.grid(alpha=0.3)
  _save(fig, path)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_final_vs_key(results: Sequence[Mapping[str, Any]], key: str, keys: Sequence[str],
                      path: str) -> None:
  """Final eval loss (mean ± std over ok seeds) against ``key``; one series per
  combination of the other varied keys."""
  points: dict[tuple, dict[Any, list[float]]] = {}
  values: list[Any] = []
  for r in results:
    ov = r['overrides']
    if key not in ov or r['status'] != 'ok' or r['final_eval_loss'] is None:
      continue
    x = ov[key] if _is_num(ov[key]) else str(ov[key])
    series = tuple((k, str(ov[k])) for k in keys if k != key and k in ov)
    points.setdefault(series, {}).setdefault(x, []).append(r['final_eval_loss'])
    if x not in values:
      values.append(x)
  numeric = bool(values) and all(_is_num(v) for v in values)
  order = sorted(values) if numeric else values
  fig, ax = _figure(6.0, 4.0)
  for series, by_x in points.items():
    xs = [x for x in order if x in by_x]
    pos = xs if numeric else [order.index(x) for x in xs]
    means = [statistics.fmean(by_x[x]) for x in xs]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
    label = ', '.join(f'{k}={v}' for k, v in series) or None
    ax.errorbar(pos, means, yerr=stds if any(stds) else None, marker='o', capsize=3,
                label=label)
  if not points:
    _no_data(ax, f'no finished run sets {key}')
  elif any(s for s in points):
    ax.legend(fontsize='x-small', loc='best')
  if numeric and order and min(order) > 0 and max(order) / min(order) >= 10:
    ax.set_xscale('log')
  if not numeric and order:
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(v) for v in order], rotation=30, ha='right', fontsize='small')
  ax.set_xlabel(key)
  ax.set_ylabel('final eval loss')
  ax.grid(alpha=0.3)
  _save(fig, path)


def write_plots(sweep_dir: str, results: Sequence[Mapping[str, Any]], keys: Sequence[str],
                seeds: bool = False) -> list[str]:
  """Writes eval_loss.png, train_loss.png and final_<key>.png; returns their file names."""
  del seeds  # Runs of a setting are grouped by 'setting' whether or not seeds are swept.
  names = ['eval_loss.png', 'train_loss.png']
  plot_curves(results, 'eval', os.path.join(sweep_dir, names[0]))
  plot_curves(results, 'train', os.path.join(sweep_dir, names[1]))
  for key in keys:
    name = key_filename(key)
    plot_final_vs_key(results, key, keys, os.path.join(sweep_dir, name))
    names.append(name)
  return names
