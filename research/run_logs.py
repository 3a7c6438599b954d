"""What a run directory logged, read without JAX: metrics.jsonl rows, summary, config.

Used by the sweep's tables, the sweep plots and ``launch.plot_runs``. A run still being
written (or killed mid-write) is read as far as it is valid.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

SUMMARY = 'summary.json'
METRICS = 'metrics.jsonl'
CONFIG = 'config.json'


def is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_json(path: str) -> dict[str, Any] | None:
  """A JSON object from ``path``; None when missing, unreadable or not an object."""
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
  rows = []
  try:
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  except OSError:
    pass
  return rows


def curve(rows: Iterable[Mapping[str, Any]], split: str, key: str = 'loss'
          ) -> list[tuple[int, float]]:
  """(step, value) sorted by step; a step logged twice (resume) keeps its last value."""
  by_step: dict[int, float] = {}
  for r in rows:
    if r.get('split') == split and is_number(r.get(key)) and is_number(r.get('step')):
      by_step[int(r['step'])] = float(r[key])
  return sorted(by_step.items())


def tokens_by_step(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, float]]:
  """(step, tokens seen after it) from the train rows that log ``tokens_seen``."""
  return curve(rows, 'train', 'tokens_seen')


def batch_sizes(rows: Iterable[Mapping[str, Any]]) -> set[float]:
  """The distinct global batch sizes a run's train rows logged (a ramp logs several)."""
  return {float(r['batch_size']) for r in rows
          if r.get('split') == 'train' and is_number(r.get('batch_size'))}


def flat_config(run_dir: str) -> dict[str, Any]:
  """The run's resolved config (config.json's ``config``) as dotted key -> value."""
  d = read_json(os.path.join(run_dir, CONFIG)) or {}
  out: dict[str, Any] = {}

  def walk(node: Any, prefix: str) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f'{prefix}{k}.')
    else:
      out[prefix[:-1]] = node

  walk(d.get('config', {}), '')
  return out
