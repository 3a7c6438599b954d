"""Downstream results as ``metrics.jsonl`` rows, and reading them back for tables.

A row per task and step: ``{"step", "split": "downstream/NAME", "acc", "acc_low",
"acc_high", "acc_norm", "acc_norm_low", "acc_norm_high", "n", "chance"}`` (the
interval is the 95% Wilson interval). Rows are appended (the run's file stays
append-only); a reader takes the last row of each (task, step), so re-evaluating a
step supersedes the earlier result.

For sweep tables (research/sweep/ reads runs through this): :func:`downstream_columns`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from research import run_logs

PREFIX = 'downstream/'
ROW_KEYS = ('acc', 'acc_low', 'acc_high', 'acc_norm', 'acc_norm_low', 'acc_norm_high', 'n',
            'chance')


def rows(results: dict[str, dict[str, Any]], step: int | None) -> list[dict[str, Any]]:
  """The metrics.jsonl rows of ``run_tasks``' results at ``step``."""
  return [{'step': int(step or 0), 'split': PREFIX + name,
           **{k: r[k] for k in ROW_KEYS if k in r}} for name, r in results.items()]


def _read(run_dir: str) -> list[dict[str, Any]]:
  """The run's downstream rows (research.run_logs reads the file, torn lines skipped)."""
  rows = run_logs.read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  return [r for r in rows if str(r.get('split', '')).startswith(PREFIX)]


def downstream_rows(run_dir: str) -> dict[str, dict[int, dict[str, Any]]]:
  """{task: {step: the last row written for it}} of a run directory."""
  out: dict[str, dict[int, dict[str, Any]]] = {}
  for row in _read(run_dir):
    out.setdefault(row['split'][len(PREFIX):], {})[int(row['step'])] = row
  return out


def downstream_columns(run_dir: str, keys: tuple[str, ...] = ('acc', 'acc_low', 'acc_high')
                       ) -> dict[str, float]:
  """``{'NAME/acc': ..., 'NAME/acc_low': ..., 'NAME/step': ...}`` at each task's latest
  evaluated step; {} when the run has no downstream rows."""
  out: dict[str, float] = {}
  for name, by_step in sorted(downstream_rows(run_dir).items()):
    step = max(by_step)
    row = by_step[step]
    out.update({f'{name}/{k}': row[k] for k in keys if k in row})
    out[f'{name}/step'] = step
  return out


def append_rows(run_dir: str, new_rows: list[dict[str, Any]]) -> str:
  """Appends rows to ``run_dir/metrics.jsonl`` in one write; returns the path."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  text = ''.join(json.dumps(r) + '\n' for r in new_rows)
  with open(path, 'a') as f:
    f.write(text)
  return path
