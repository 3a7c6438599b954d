"""Plots of runs and sweeps (matplotlib Agg canvas, no pyplot state).

What every figure here does, so that 2 runs and 20 read the same way:
- labels name only the keys that vary between the plotted runs, by their short names
  (``learning_rate=0.003``, not ``optimizer.learning_rate=0.003``);
- the legend sits outside the axes (right), never over the data;
- colour encodes one varied key (or the combination of the others) and line style a
  second one with at most 4 values; colours come from tab10/tab20, or an evenly sampled
  colormap beyond 20, so 16+ runs stay distinct;
- the x-axis is tokens seen when batch sizes differ between (or within) runs, else steps;
- seeds of one setting are drawn as their mean with a ±1 std band;
- a figure that would show a single point is not drawn: curves need a run with two
  logged points, ``final_<key>.png`` a key with two finished values;
- final metrics are lines against a key only when the settings form a full grid;
  otherwise (and as an overview of every sweep) a bar per setting.

Inputs are :class:`Series` (one per run); :func:`sweep_series` builds them from the
sweep's per-run results and :func:`run_series` from run directories.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from research import run_logs
from research.key_names import describe, format_value, short_names, varying_keys

STYLES = ('-', '--', ':', '-.')
MARKERS = ('o', 's', '^', 'D')


@dataclasses.dataclass
class Series:
  """One run: its settings, a logged curve and its final value."""
  setting: dict[str, Any]  # Config key -> value (sweep overrides, or a run's config).
  group: str  # Runs of one group are seeds of one setting (averaged).
  name: str  # Run directory name (the label when no key varies).
  curve: list[tuple[int, float]]  # (step, value).
  tokens: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, tokens)
  batch_sizes: list[float] = dataclasses.field(default_factory=list)
  final: float | None = None
  ok: bool = True


# ---------------------------------------------------------------------------------
# Building series.


def sweep_series(results: Sequence[Mapping[str, Any]], split: str) -> list[Series]:
  """Series of a sweep's per-run results (research.sweep.results.run_result)."""
  out = []
  for r in results:
    setting = {k: v for k, v in r['overrides'].items() if k != 'seed'}
    out.append(Series(setting=setting, group=r['setting'], name=r['name'],
                      curve=list(r[f'{split}_curve']), tokens=list(r.get('tokens_curve', [])),
                      batch_sizes=list(r.get('batch_sizes', [])),
                      final=r.get('final_eval_loss'), ok=r['status'] == 'ok'))
  return out


# Keys that differ between any two runs without being a setting of the experiment.
_RUN_NOISE = re.compile(r'^(workdir|.*_dir|.*\.path)$')


def run_series(run_dirs: Sequence[str], metric: str = 'loss', split: str = 'eval'
               ) -> list[Series]:
  """One series per run directory: ``metric`` of its ``split`` rows, final = last value."""
  out = []
  for d in run_dirs:
    rows = run_logs.read_metrics(os.path.join(d, run_logs.METRICS))
    cur = run_logs.curve(rows, split, metric)
    setting = {k: v for k, v in run_logs.flat_config(d).items() if not _RUN_NOISE.match(k)}
    name = os.path.basename(os.path.normpath(d))
    out.append(Series(setting=setting, group=os.path.abspath(d), name=name, curve=cur,
                      tokens=run_logs.tokens_by_step(rows),
                      batch_sizes=sorted(run_logs.batch_sizes(rows)),
                      final=cur[-1][1] if cur else None,
                      ok=os.path.isfile(os.path.join(d, run_logs.SUMMARY))))
  return out


# ---------------------------------------------------------------------------------
# Labels, colours and styles.


def _groups(series: Sequence[Series]) -> dict[str, list[Series]]:
  out: dict[str, list[Series]] = {}
  for s in series:
    out.setdefault(s.group, []).append(s)
  return out


def colours(n: int) -> list[Any]:
  """n distinct colours: tab10 up to 10, tab20 up to 20, else an even colormap sample."""
  if n <= 10:
    return [colormaps['tab10'](i) for i in range(n)]
  if n <= 20:
    return [colormaps['tab20'](i) for i in range(n)]
  cmap = colormaps['turbo']
  return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


@dataclasses.dataclass
class Encoding:
  """How a figure tells settings apart: which keys vary, their short names, and the
  colour / line style of each setting (by group)."""
  keys: list[str]
  names: dict[str, str]
  style_key: str | None
  marker_key: str | None
  colour: dict[str, Any]
  style: dict[str, str]
  marker: dict[str, str | None]
  label: dict[str, str]
  by_name: bool  # Labels are run names: too many keys differ to list them.


def encode(series: Sequence[Series], max_label_keys: int | None = None) -> Encoding:
  """Line style for the varied key with the fewest (<= 4) values, marker for the next
  one when three or more keys vary, colour for the rest (one key, or the combination).

  Labels name the varied keys a setting sets (a key it leaves at the config's default
  is left out once three or more keys vary), wrapped at 60 characters; with more than
  ``max_label_keys`` varied keys (runs of unrelated configs) the run name instead.
  """
  groups = _groups(series)
  settings = {g: ss[0].setting for g, ss in groups.items()}
  keys = varying_keys(list(settings.values()))
  names = short_names(keys)

  def values(k):
    return list(dict.fromkeys(format_value(s.get(k, 'default')) for s in settings.values()))

  def fewest(cands):
    cands = [k for k in cands if 2 <= len(values(k)) <= len(STYLES)]
    return min(cands, key=lambda k: (len(values(k)), -keys.index(k))) if cands else None

  style_key = fewest(keys) if len(keys) >= 2 else None
  marker_key = fewest([k for k in keys if k != style_key]) if len(keys) >= 3 else None
  colour_keys = [k for k in keys if k not in (style_key, marker_key)]
  combo = {g: tuple(format_value(s.get(k, 'default')) for k in colour_keys)
           for g, s in settings.items()}
  combos = list(dict.fromkeys(combo.values()))
  palette = colours(len(combos))
  colour = {g: palette[combos.index(combo[g])] for g in settings}
  style_values = values(style_key) if style_key else []
  style = {g: STYLES[style_values.index(format_value(s.get(style_key, 'default')))]
           if style_key else '-' for g, s in settings.items()}
  marker_values = values(marker_key) if marker_key else []
  marker = {g: MARKERS[marker_values.index(format_value(s.get(marker_key, 'default')))]
            if marker_key else None for g, s in settings.items()}
  label = {}
  by_name = max_label_keys is not None and len(keys) > max_label_keys
  for g, s in settings.items():
    if keys and not by_name:
      label[g] = describe(s, keys, names, sparse=len(keys) >= 3, width=60)
    else:  # Nothing (or too much) varies: the run name; keys go into the title.
      label[g] = groups[g][0].name if len(groups[g]) == 1 else g
  return Encoding(keys, names, style_key, marker_key, colour, style, marker, label, by_name)


# ---------------------------------------------------------------------------------
# Figures.


def _figure(width: float = 7.0, height: float = 4.5) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot(1, 1, 1)


def legend_outside(ax: Any, n: int, title: str | None = None) -> Any:
  """A legend right of the axes (saved with bbox_inches='tight', so it is in the PNG)."""
  return ax.legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                   fontsize='small' if n <= 12 else 'x-small', ncol=1 if n <= 24 else 2,
                   title=title, title_fontsize='small', frameon=False)


def save(fig: Figure, path: str) -> None:
  fig.savefig(path, format='png', bbox_inches='tight')


def _use_tokens(series: Sequence[Series]) -> bool:
  """Tokens on x when batch sizes differ between or within runs (and all log tokens)."""
  sizes = {b for s in series for b in s.batch_sizes}
  return len(sizes) > 1 and all(s.tokens for s in series)


def _tokens_at(s: Series, steps: Sequence[int]) -> np.ndarray:
  """Tokens seen after each step, interpolated between the logged train rows."""
  st = np.array([0] + [p for p, _ in s.tokens], dtype=float)
  tk = np.array([0] + [t for _, t in s.tokens], dtype=float)
  return np.interp(np.asarray(steps, dtype=float), st, tk)


def _mean_curve(runs: Sequence[Series]) -> tuple[list[int], np.ndarray, np.ndarray]:
  """Steps logged by every run, the mean value there and the sample std (0 for one)."""
  common = sorted(set.intersection(*(set(p for p, _ in r.curve) for r in runs)))
  vals = np.array([[dict(r.curve)[p] for p in common] for r in runs], dtype=float)
  std = vals.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
  return common, vals.mean(axis=0), std


def curves_figure(series: Sequence[Series], ylabel: str, title: str,
                  max_label_keys: int | None = None) -> Figure | None:
  """One line per setting (mean over its seeds, ±1 std band); None if no line has 2
  points."""
  drawn = [s for s in series if s.curve]
  if not any(len(s.curve) >= 2 for s in drawn):
    return None
  enc = encode(drawn, max_label_keys)
  tokens = _use_tokens(drawn)
  fig, ax = _figure()
  groups = _groups(drawn)
  for g, runs in groups.items():
    steps, mean, std = _mean_curve(runs)
    if not steps:
      continue
    x = _tokens_at(runs[0], steps) if tokens else np.asarray(steps)
    ok = all(r.ok for r in runs)
    n = len(runs)
    label = enc.label[g] + ('' if ok else ' (not finished ok)') + (f' (n={n})' if n > 1 else '')
    marker = enc.marker[g] or ('o' if len(steps) < 12 else None)
    ax.plot(x, mean, enc.style[g], color=enc.colour[g], alpha=1.0 if ok else 0.5,
            marker=marker, markersize=4 if enc.marker[g] else 3,
            markevery=max(1, len(steps) // 8), label=label)
    if n > 1:
      ax.fill_between(x, mean - std, mean + std, color=enc.colour[g], alpha=0.15, lw=0)
  ax.set_xlabel('tokens seen' if tokens else 'step')
  if not tokens:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  ax.set_title(title + _keys_note(enc))
  ax.grid(alpha=0.3)
  legend_outside(ax, len(groups))
  return fig


def _keys_note(enc: Encoding) -> str:
  return f'\n({len(enc.keys)} config keys differ: labels are run names)' if enc.by_name else ''


def _finals(series: Sequence[Series], require_ok: bool = True) -> dict[str, list[float]]:
  out: dict[str, list[float]] = {}
  for s in series:
    if (s.ok or not require_ok) and s.final is not None and math.isfinite(s.final):
      out.setdefault(s.group, []).append(s.final)
  return out


def is_grid(settings: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> bool:
  """Whether the settings are the full product of each varied key's values."""
  if not keys:
    return False
  combos = {tuple(format_value(s.get(k, 'default')) for k in keys) for s in settings}
  n = 1
  for k in keys:
    n *= len({format_value(s.get(k, 'default')) for s in settings})
  return len(combos) == n == len(settings)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def final_vs_key_figure(series: Sequence[Series], key: str, ylabel: str) -> Figure | None:
  """Final value against ``key`` (numeric), one line per combination of the other
  varied keys, mean ± std over seeds; None unless ``key`` has 2 finished values."""
  finals = _finals(series)
  done = [s for s in series if s.group in finals]
  firsts = list({s.group: s for s in done}.values())
  if key not in {k for s in firsts for k in s.setting}:
    return None
  xs = sorted({s.setting.get(key) for s in firsts if _is_num(s.setting.get(key))})
  if len(xs) < 2 or any(not _is_num(s.setting.get(key)) for s in firsts):
    return None
  other_enc = encode([dataclasses.replace(s, setting={k: v for k, v in s.setting.items()
                                                      if k != key},
                                          group=_other_group(s, key)) for s in done])
  lines: dict[str, dict[float, list[float]]] = {}
  for s in firsts:
    lines.setdefault(_other_group(s, key), {})[s.setting[key]] = finals[s.group]
  fig, ax = _figure(6.5, 4.0)
  for g, by_x in lines.items():
    pts = sorted(by_x)
    means = [statistics.fmean(by_x[x]) for x in pts]
    stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in pts]
    ax.errorbar(pts, means, yerr=stds if any(stds) else None, capsize=3,
                linestyle=other_enc.style[g], color=other_enc.colour[g], marker='o',
                label=other_enc.label[g] if other_enc.keys else None)
  if min(xs) > 0 and max(xs) / min(xs) >= 10:
    ax.set_xscale('log')
  ax.set_xticks(xs)
  ax.set_xticklabels([format_value(x) for x in xs], fontsize='small')
  ax.minorticks_off()
  names = short_names(other_enc.keys + [key])
  ax.set_xlabel(f'{names[key]} ({key})' if names[key] != key else key)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if other_enc.keys:
    legend_outside(ax, len(lines))
  return fig


def _other_group(s: Series, key: str) -> str:
  return repr(sorted((k, format_value(v)) for k, v in s.setting.items() if k != key))


def bars_figure(series: Sequence[Series], ylabel: str, title: str, require_ok: bool = True,
                max_label_keys: int | None = None) -> Figure | None:
  """A horizontal bar per setting (mean ± std over seeds), in sweep order; None for
  fewer than 2 settings with a final value (of a run finished ok, with require_ok)."""
  finals = _finals(series, require_ok)
  if len(finals) < 2:
    return None
  done = [s for s in series if s.group in finals]
  enc = encode(done, max_label_keys)
  groups = list(dict.fromkeys(s.group for s in done))
  means = [statistics.fmean(finals[g]) for g in groups]
  stds = [statistics.stdev(finals[g]) if len(finals[g]) > 1 else 0.0 for g in groups]
  fig, ax = _figure(6.5, max(2.5, 0.9 + 0.32 * len(groups)))
  y = np.arange(len(groups))[::-1]
  bars = ax.barh(y, means, xerr=stds if any(stds) else None, capsize=3,
                 color=[enc.colour[g] for g in groups], height=0.7)
  for b, g in zip(bars, groups):
    if enc.style[g] != '-':  # The style key's second value onwards: hatched.
      b.set_hatch({'--': '//', ':': '..', '-.': 'xx'}[enc.style[g]])
  ax.bar_label(bars, labels=[f'{m:.4f}' + (f' ± {s:.4f}' if s else '')
                             for m, s in zip(means, stds)], padding=3, fontsize='x-small')
  ax.set_yticks(y)
  ax.set_yticklabels([enc.label[g] + (f' (n={len(finals[g])})' if len(finals[g]) > 1 else '')
                      for g in groups], fontsize='small' if len(groups) <= 12 else 'x-small')
  lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
  span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
  ax.set_xlim(max(0.0, lo - 0.5 * span) if lo >= 0 else lo - 0.5 * span, hi + 0.45 * span)
  ax.set_xlabel(ylabel + ('' if ax.get_xlim()[0] == 0 else ' (axis does not start at 0)'))
  ax.set_title(title + _keys_note(enc))
  ax.grid(axis='x', alpha=0.3)
  return fig


def key_filename(key: str) -> str:
  """``final_<key>.png`` with the key made filesystem-safe (``final_model.d_model.png``)."""
  return f'final_{re.sub(r"[^A-Za-z0-9._-]", "_", key)}.png'


def sweep_figures(results: Sequence[Mapping[str, Any]]) -> dict[str, Figure]:
  """File name -> figure for a sweep: loss curves, final eval loss per setting (bars),
  and final eval loss against each numeric key of a full grid."""
  figs: dict[str, Figure | None] = {}
  for split in ('eval', 'train'):
    figs[f'{split}_loss.png'] = curves_figure(sweep_series(results, split), f'{split} loss',
                                              f'{split} loss per setting')
  series = sweep_series(results, 'eval')
  figs['final_eval_loss.png'] = bars_figure(series, 'final eval loss',
                                            'final eval loss per setting')
  finals = _finals(series)
  firsts = list({s.group: s for s in series if s.group in finals}.values())
  keys = varying_keys([s.setting for s in firsts])
  if is_grid([s.setting for s in firsts], keys):
    for key in keys:
      figs[key_filename(key)] = final_vs_key_figure(series, key, 'final eval loss')
  return {k: v for k, v in figs.items() if v is not None}


def write_sweep_plots(sweep_dir: str, results: Sequence[Mapping[str, Any]]) -> list[str]:
  """Writes :func:`sweep_figures` into ``sweep_dir``; returns the file names. Stale
  plots of an earlier collect that this one does not draw are removed."""
  figs = sweep_figures(results)
  for f in os.listdir(sweep_dir):
    if f.endswith('.png') and f not in figs and (f.endswith('_loss.png')
                                                 or f.startswith('final_')):
      os.remove(os.path.join(sweep_dir, f))
  for name, fig in figs.items():
    save(fig, os.path.join(sweep_dir, name))
  return list(figs)


RUN_LABEL_KEYS = 6  # Runs of unrelated configs: more differing keys -> run names.


def run_figures(series: Sequence[Series], metric: str, split: str) -> dict[str, Figure]:
  """File name -> figure comparing runs: ``<split>_<metric>.png`` curves and
  ``final_<split>_<metric>.png`` bars of each run's last value."""
  what = f'{split} {metric}'
  figs = {f'{split}_{metric}.png': curves_figure(series, what, f'{what} per run',
                                                 RUN_LABEL_KEYS),
          f'final_{split}_{metric}.png': bars_figure(series, f'last {what}',
                                                     f'last {what} per run', False,
                                                     RUN_LABEL_KEYS)}
  return {k: v for k, v in figs.items() if v is not None}
