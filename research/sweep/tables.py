"""The sweep's tables: results.csv (full key names, raw numbers) and results.md.

Columns have one meaning each: a swept key's column holds the configured value, the
metrics are what the run did. (Before, the run's ``steps`` and a swept ``steps`` key
were both headed "steps"; the run's count is now ``steps_done``.)
"""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

from research.key_names import short_names
from research.sweep.plan import format_value

METRIC_COLUMNS = ('final_train_loss', 'final_eval_loss', 'best_eval_loss', 'eval_tokens',
                  'tokens_seen', 'wall_time_s', 'steps_done', 'param_count')
STD_COLUMNS = ('final_train_loss', 'final_eval_loss', 'best_eval_loss', 'wall_time_s')
_HEADS = {'final_train_loss': 'final train loss', 'final_eval_loss': 'final eval loss',
          'best_eval_loss': 'best eval loss', 'eval_tokens': 'eval tokens',
          'tokens_seen': 'tokens', 'downstream': 'downstream (acc, 95% CI)',
          'wall_time_s': 'wall time (s)', 'steps_done': 'steps done', 'param_count': 'params',
          'n_ok': 'ok runs'}


def _csv_value(x: Any) -> str:
  if x is None:
    return ''
  if isinstance(x, float):
    return repr(x)
  return str(x)


def table_columns(keys: Sequence[str], seeds: bool) -> list[str]:
  """results.csv columns: name, the keys, [seeds, n_ok,] status, metrics [+ _std], error."""
  cols = ['name', *keys]
  if seeds:
    cols += ['seeds', 'n_ok']
  cols.append('status')
  for k in METRIC_COLUMNS:
    cols.append(k)
    if seeds and k in STD_COLUMNS:
      cols.append(f'{k}_std')
  cols += ['downstream', 'error']
  return cols


def table_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], seeds: bool
               ) -> list[dict[str, str]]:
  """``rows`` (per-run results, or per-setting aggregates with seeds) as CSV cells."""
  out = []
  for r in rows:
    d = {'name': r['name']}
    for k in keys:
      d[k] = format_value(r['overrides'][k]) if k in r['overrides'] else ''
    for c in table_columns(keys, seeds):
      if c not in d:
        d[c] = _csv_value(r.get(c))
    out.append(d)
  return out


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator='\n')
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def _fmt(x: str, column: str) -> str:
  if x == '':
    return ''
  v = float(x)
  if column.endswith('loss') or column.endswith('loss_std'):
    return f'{v:.4f}'
  if column.startswith('wall_time_s'):
    return f'{v:.1f}'
  return f'{v:,.0f}'


def _md_cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def to_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, str]], keys: Sequence[str]
                ) -> str:
  """The table of results.md: keys by their short names, metrics as ``mean ± std`` when
  seeds are swept, no error column when no run has an error."""
  names = short_names(keys)
  shown = [c for c in columns if not c.endswith('_std')
           and not (c in ('error', 'downstream') and not any(r.get(c) for r in rows))]
  lines = ['| ' + ' | '.join(names.get(c) or _HEADS.get(c, c) for c in shown) + ' |',
           '|' + '|'.join('---:' if c in METRIC_COLUMNS else '---' for c in shown) + '|']
  for r in rows:
    cells = []
    for c in shown:
      if c in METRIC_COLUMNS:
        cell = _fmt(r[c], c)
        std = r.get(f'{c}_std', '')
        if cell and std:
          cell += f' ± {_fmt(std, c)}'
        cells.append(cell)
      elif c in keys:
        cells.append(f'`{r[c]}`' if r[c] else '(default)')
      else:
        cells.append(r[c])
    lines.append('| ' + ' | '.join(_md_cell(x) for x in cells) + ' |')
  return '\n'.join(lines) + '\n'


def key_legend(keys: Sequence[str]) -> str:
  """'Columns: `d_model` = `model.d_model`, ...' for the keys whose short name differs."""
  names = short_names(keys)
  parts = [f'`{names[k]}` = `{k}`' for k in keys if names[k] != k]
  return ('Swept keys: ' + ', '.join(parts) + '.\n') if parts else ''
