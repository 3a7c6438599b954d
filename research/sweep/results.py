"""Collecting a sweep: per-run results from the run directories, per-setting means over
seeds, and the files DIR/results.{md,csv} (+ results_runs.csv with seeds) and plots."""

from __future__ import annotations

import os
import shlex
import statistics
from typing import Any, Mapping, Sequence

from research import run_logs
from research.sweep import tables
from research.sweep.plan import Plan, Run, write_atomic, read_plan
from research.sweep.status import OK, run_state


def downstream_cell(run_dir: str) -> str:
  """'stdlib_mc 0.278 [0.253, 0.304] @400; ...' from the run's downstream rows."""
  from research.downstream.results import downstream_columns
  cols = downstream_columns(run_dir)
  names = sorted({k.rsplit('/', 1)[0] for k in cols})
  return '; '.join(
      f"{n} {cols[f'{n}/acc']:.3f} [{cols.get(f'{n}/acc_low', float('nan')):.3f}, "
      f"{cols.get(f'{n}/acc_high', float('nan')):.3f}] @{int(cols[f'{n}/step'])}"
      for n in names if f'{n}/acc' in cols)


def run_result(run: Run) -> dict[str, Any]:
  """Status, error, final metrics and curves of one run (partial runs: from metrics.jsonl)."""
  status, error = run_state(run)
  summary = run_logs.read_json(os.path.join(run.workdir, run_logs.SUMMARY)) or {}
  rows = run_logs.read_metrics(os.path.join(run.workdir, run_logs.METRICS))
  train, evals = run_logs.curve(rows, 'train'), run_logs.curve(rows, 'eval')
  tokens = run_logs.tokens_by_step(rows)
  res: dict[str, Any] = {
      'index': run.index, 'name': run.name, 'setting': run.setting, 'seed': run.seed,
      'label': run.label, 'overrides': run.overrides, 'status': status, 'error': error,
      'train_curve': train, 'eval_curve': evals, 'tokens_curve': tokens,
      'batch_sizes': sorted(run_logs.batch_sizes(rows))}
  res['final_train_loss'] = summary.get('final_train_loss', train[-1][1] if train else None)
  res['final_eval_loss'] = summary.get('final_eval_loss', evals[-1][1] if evals else None)
  res['best_eval_loss'] = min((v for _, v in evals), default=None)
  last_eval = next((r for r in reversed(rows) if r.get('split') == 'eval'), {})
  res['eval_tokens'] = last_eval.get('num_tokens')  # What the eval loss averages over.
  res['downstream'] = downstream_cell(run.workdir)
  res['tokens_seen'] = summary.get('tokens_seen', tokens[-1][1] if tokens else None)
  res['wall_time_s'] = summary.get('wall_time_s')
  res['steps_done'] = summary.get('steps', max((s for s, _ in train), default=None))
  res['param_count'] = summary.get('param_count')
  for k in tables.METRIC_COLUMNS:
    if not run_logs.is_number(res[k]):
      res[k] = None
  return res


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting: mean and sample std (n-1) of each metric over its ok runs."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in results:
    groups.setdefault(r['setting'], []).append(r)
  rows = []
  for setting, rs in groups.items():
    ok = [r for r in rs if r['status'] == OK]
    counts: dict[str, int] = {}
    for r in rs:
      counts[r['status']] = counts.get(r['status'], 0) + 1
    status = OK if len(ok) == len(rs) else ', '.join(f'{k} {v}/{len(rs)}'
                                                       for k, v in counts.items())
    row: dict[str, Any] = {
        'name': setting, 'overrides': {k: v for k, v in rs[0]['overrides'].items()
                                       if k != 'seed'},
        'seeds': ' '.join(str(r['seed']) for r in rs), 'n_ok': len(ok), 'status': status,
        'error': '; '.join(f'seed={r["seed"]}: {r["error"]}' for r in rs if r['error']),
        'downstream': '; '.join(f'seed={r["seed"]}: {r["downstream"]}' for r in ok
                                if r.get('downstream'))}
    for k in tables.METRIC_COLUMNS:
      vals = [r[k] for r in ok if r[k] is not None]
      mean = statistics.fmean(vals) if vals else None
      if (k not in tables.STD_COLUMNS and mean is not None
          and all(float(v).is_integer() for v in vals)):
        mean = round(mean) if mean.is_integer() else mean  # Counts stay integers.
      row[k] = mean
      if k in tables.STD_COLUMNS:
        row[f'{k}_std'] = statistics.stdev(vals) if len(vals) > 1 else None
    rows.append(row)
  return rows


def collect(sweep_dir: str, plan: Plan | None = None, *, plots: bool = True
            ) -> list[dict[str, Any]]:
  """Writes results.csv, results.md (and results_runs.csv with seeds) and the plots.

  Returns the per-run results (status, error, metrics, curves).
  """
  plan = plan or read_plan(sweep_dir)
  results = [run_result(r) for r in plan.runs]
  seeds = bool(plan.seeds)
  cols = tables.table_columns(plan.keys, seeds)
  rows = tables.table_rows(aggregate(results) if seeds else results, plan.keys, seeds)
  write_atomic(os.path.join(sweep_dir, 'results.csv'), tables.to_csv(cols, rows))
  if seeds:
    run_keys = plan.keys + ['seed']
    write_atomic(os.path.join(sweep_dir, 'results_runs.csv'),
                tables.to_csv(tables.table_columns(run_keys, False),
                              tables.table_rows(results, run_keys, False)))
  images: list[str] = []
  if plots:
    from research import plots as plots_lib  # matplotlib only when plotting.
    images = plots_lib.write_sweep_plots(sweep_dir, results)
  counts: dict[str, int] = {}
  for r in results:
    counts[r['status']] = counts.get(r['status'], 0) + 1
  md = ['# Sweep results\n',
        f'Config `{plan.config}`'
        + (f' with `{shlex.join(plan.extra_args)}`' if plan.extra_args else '')
        + (f', seeds {plan.seeds} (mean ± sample std over the ok runs)' if seeds else '')
        + f'; {len(results)} runs: '
        + ', '.join(f'{v} {k}' for k, v in counts.items()) + '. Run directories are '
        'named index-hash(-seedN); sweep.json maps each to its overrides.\n',
        tables.key_legend(plan.keys),
        tables.to_markdown(cols, rows, plan.keys)]
  md += [f'![{os.path.splitext(p)[0]}]({p})\n' for p in images]
  write_atomic(os.path.join(sweep_dir, 'results.md'), '\n'.join(m for m in md if m))
  return results
