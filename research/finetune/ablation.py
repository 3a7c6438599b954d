r"""The fine-tuning ablation in one command: pretrain, sweep, and an accuracy table.

  python -m research.finetune.ablation --workdir=DIR \
      [--config=experiments/finetune/stdlib_modules.py] [--smoke] [--parallel=N] \
      [--collect_only]

1. Pretrains the config's ``finetune.pretrain_config`` into ``DIR/pretrain`` (a
   ``launch.train`` run; skipped when it has finished, resumed when it has not).
2. Runs the config's ``sweep()`` with ``pretrained=DIR/pretrain`` through
   ``research.sweep`` (``DIR/<run>/``, ``DIR/results.md`` with the losses, plots).
3. Writes ``DIR/results_finetune.md`` / ``.csv``: one row per run with the
   initialisation, mode, trainable parameters, eval accuracy, macro-F1 and loss, and
   for every mode whether the pretrained start beat from-scratch.

Exit codes: 0 all runs ok; 1 an error or a failed run (tables still written).
"""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

from research import config_files, sweep
from research.runtime import one_line

DEFAULT_CONFIG = 'experiments/finetune/stdlib_modules.py'
RESULTS = 'results_finetune'



def config_string(config: str, workdir: str, smoke: bool) -> str:
  arg = f'pretrained={os.path.join(os.path.abspath(workdir), "pretrain")}'
  return f'{config}:{arg}{",smoke=True" if smoke else ""}'


def pretrain_command(config_str: str, workdir: str, python: str = sys.executable
                     ) -> list[str] | None:
  """The launch.train command of the config's pretraining (None if it has none)."""
  module, arg = config_files.load_config_module(config_str)
  c = module.get_config(arg)
  f = c.finetune
  if not f.pretrain_config:
    return None
  overrides = {k: v for k, v in f.pretrain_overrides}
  return sweep.train_command(python, f.pretrain_config, os.path.join(workdir, 'pretrain'),
                             overrides, [])


def _last_eval(workdir: str) -> dict[str, Any]:
  rows = [r for r in sweep.read_metrics(os.path.join(workdir, sweep.METRICS))
          if r.get('split') == 'eval']
  return rows[-1] if rows else {}


def _read_json(path: str) -> dict[str, Any]:
  return sweep.read_json(path) or {}


def rows_for(plan: sweep.Plan) -> list[dict[str, Any]]:
  rows = []
  for run in plan.runs:
    status, error = sweep.run_state(run)
    ov = run.overrides
    ev = _last_eval(run.workdir)
    report = _read_json(os.path.join(run.workdir, 'init_report.json'))
    summary = _read_json(os.path.join(run.workdir, sweep.SUMMARY))
    mode = ov.get('finetune.mode', 'full')
    if mode == 'lora':
      mode = f'lora r={ov.get("finetune.lora_rank")}'
    rows.append({
        'name': run.name, 'init': 'pretrained' if ov.get('finetune.init_from') else 'scratch',
        'mode': mode, 'status': status, 'error': error,
        'trainable_params': report.get('trainable_params'),
        'lora_params': report.get('lora_params'),
        'accuracy': ev.get('accuracy'), 'macro_f1': ev.get('macro_f1'),
        'eval_loss': ev.get('loss'), 'eval_examples': ev.get('num_examples'),
        'steps': summary.get('steps'),
        'wall_time_s': summary.get('wall_time_s')})
  return rows


def _fmt(v: Any, kind: str) -> str:
  if v is None:
    return ''
  if kind == 'int':
    return f'{int(v):,}'
  if kind == 'pct':
    return f'{100 * float(v):.1f}'
  if kind == 'f3':
    return f'{float(v):.3f}'
  if kind == 's':
    return f'{float(v):.0f}'
  return str(v)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
  """'mode: pretrained acc X vs scratch Y: better/worse/no verdict' per mode with both.

  A verdict needs the accuracy gap to exceed two standard errors of a difference of two
  proportions, sqrt(p1(1-p1)/n + p2(1-p2)/n) on the n eval examples (about a 95% test;
  unpaired, so conservative for the shared eval set). The smallest gap that can get a
  verdict is then about 2*sqrt(2*0.25/n): 29 accuracy points at the smoke size's 24
  examples (no verdict is meaningful there), 6 points at 500, 2 at 5,000.
  """
  out = []
  by = {(r['init'], r['mode']): r for r in rows}
  for mode in dict.fromkeys(r['mode'] for r in rows):
    p, s = by.get(('pretrained', mode)), by.get(('scratch', mode))
    if not p or not s or p['accuracy'] is None or s['accuracy'] is None:
      continue
    n1, n2 = p.get('eval_examples') or 0, s.get('eval_examples') or 0
    gap = p['accuracy'] - s['accuracy']
    se = (math.sqrt(p['accuracy'] * (1 - p['accuracy']) / n1
                    + s['accuracy'] * (1 - s['accuracy']) / n2) if n1 and n2 else math.inf)
    if abs(gap) > 2 * se:
      verdict = 'pretrained better' if gap > 0 else 'pretrained WORSE'
    else:
      bound = 'unknown' if math.isinf(se) else f'±{200 * max(se, 1e-9):.1f} points'
      verdict = (f'no verdict: the {100 * gap:+.1f}-point gap is within 2 standard errors '
                 f'({bound} on {min(n1, n2)} eval examples)')
    out.append(f'{mode}: pretrained accuracy {100 * p["accuracy"]:.1f}% / macro-F1 '
               f'{p["macro_f1"]:.3f} vs scratch {100 * s["accuracy"]:.1f}% / '
               f'{s["macro_f1"]:.3f}: {verdict}')
  return out


def write_tables(workdir: str, plan: sweep.Plan) -> list[dict[str, Any]]:
  rows = rows_for(plan)
  cols = [('init', 'init', ''), ('mode', 'mode', ''),
          ('trainable_params', 'trainable params', 'int'),
          ('accuracy', 'accuracy (%)', 'pct'), ('macro_f1', 'macro-F1', 'f3'),
          ('eval_loss', 'eval loss', 'f3'), ('steps', 'steps', 'int'),
          ('wall_time_s', 'wall time (s)', 's'), ('status', 'status', '')]
  lines = ['| ' + ' | '.join(h for _, h, _ in cols) + ' |',
           '|' + '|'.join('---:' if k else '---' for _, _, k in cols) + '|']
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r[c], k) for c, _, k in cols) + ' |')
  pre = _read_json(os.path.join(workdir, 'pretrain', sweep.SUMMARY))
  md = ['# Fine-tuning ablation\n', f'Config `{plan.config}`; {len(rows)} runs.\n']
  if pre:
    md.append(f'Pretraining (`DIR/pretrain`): {pre.get("steps")} steps, final eval loss '
              f'{pre.get("final_eval_loss", float("nan")):.4f}, '
              f'{pre.get("wall_time_s", 0):.0f} s.\n')
  md.append('\n'.join(lines) + '\n')
  md += [f'- {v}' for v in verdicts(rows)]
  _write(os.path.join(workdir, RESULTS + '.md'), '\n'.join(md) + '\n')
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ['name'], lineterminator='\n')
  w.writeheader()
  w.writerows(rows)
  _write(os.path.join(workdir, RESULTS + '.csv'), buf.getvalue())
  return rows


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def run(workdir: str, config: str = DEFAULT_CONFIG, *, smoke: bool = False,
        parallel: int = 1, collect_only: bool = False, log=print) -> int:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg_str = config_string(config, workdir, smoke)
  plan = sweep.make_plan(cfg_str, workdir)
  if not collect_only:
    sweep.write_plan(plan, workdir)
    cmd = pretrain_command(cfg_str, workdir)
    pre_dir = os.path.join(workdir, 'pretrain')
    if cmd and not os.path.exists(os.path.join(pre_dir, sweep.SUMMARY)):
      log(f'[ablation] pretraining: {" ".join(cmd[1:])}')
      os.makedirs(pre_dir, exist_ok=True)
      t = time.time()
      with open(os.path.join(pre_dir, sweep.LOG), 'ab') as logf:
        rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT)
      if rc != 0:
        log(f'[ablation] pretraining failed (exit {rc}); see {pre_dir}/{sweep.LOG}')
        return 1
      log(f'[ablation] pretraining done in {time.time() - t:.0f} s')
    sweep.execute(plan.runs, parallel=parallel, log=log)
  sweep.collect(workdir, plan)
  rows = write_tables(workdir, plan)
  for v in verdicts(rows):
    log(f'[ablation] {v}')
  log(f'[ablation] table: {workdir}/{RESULTS}.md')
  bad = [r for r in rows if r['status'] != sweep.OK]
  if bad:
    print(f'error: {len(bad)} of {len(rows)} runs not ok ({bad[0]["name"]}: '
          f'{bad[0]["status"]} {bad[0]["error"]})', file=sys.stderr)
    return 1
  return 0


def main() -> None:
  """The command line (flags are defined here, so importing this module defines none)."""
  workdir = flags.DEFINE_string('workdir', None, 'Ablation directory.')
  config = flags.DEFINE_string('config', DEFAULT_CONFIG, 'Fine-tuning config with sweep().')
  smoke = flags.DEFINE_boolean('smoke', False, 'Smoke sizes (seconds per run; tests).')
  parallel = flags.DEFINE_integer('parallel', 1, 'Runs at once.')
  collect_only = flags.DEFINE_boolean('collect_only', False, 'Only rebuild the tables.')

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value:
      print('error: --workdir is required.', file=sys.stderr)
      sys.exit(1)
    try:
      sys.exit(run(workdir.value, config.value, smoke=smoke.value, parallel=parallel.value,
                   collect_only=collect_only.value))
    except (sweep.SweepError, ValueError) as e:
      print(f'error: {one_line(e)}', file=sys.stderr)
      sys.exit(1)

  app.run(_main)


if __name__ == '__main__':
  main()
