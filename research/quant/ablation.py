"""The quantization ablation: run a config's sweep(), export every run, tabulate.

Training runs (float, QAT) are ``python -m launch.train`` subprocesses run by
:mod:`research.sweep` (runs without ``quant.init_from`` first, so the float checkpoint
exists before the runs that start from it). PTQ runs and the integer export of every
trained run happen in this process (:func:`research.recipe.quantize`). The table compares
each run with its float reference: PTQ with the float model it quantized, QAT
fine-tuning with the float model continued-trained the same steps (``mode='none'``
with the same ``quant.init_from``), QAT from scratch with the float run of the same
length.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Sequence

from research import config_files, recipe
from research.quant import ptq
from research import sweep as sweep_lib
from research.config import override

TABLE = 'quant_results.md'


def _config_for(module, arg, run: sweep_lib.Run):
  config = module.get_config(arg) if arg is not None else module.get_config()
  override(config, run.overrides)
  return config


def _log(msg: str) -> None:
  print(f'[quant] {msg}', flush=True)


def run_ablation(config_arg: str, workdir: str, *, parallel: int = 1,
                 only: Sequence[str] = ()) -> str:
  """Runs (or resumes) the ablation in ``workdir``; returns the markdown table."""
  t0 = time.time()
  plan = sweep_lib.make_plan(config_arg, workdir, seeds=None, extra_args=[],
                             python=sys.executable)
  selected = sweep_lib.select(plan.runs, list(only))
  sweep_lib.write_plan(plan, workdir)
  module, arg = config_files.load_config_module(config_arg)
  configs = {r.name: _config_for(module, arg, r) for r in plan.runs}
  modes = {name: c.quant.mode for name, c in configs.items()}
  train_runs = [r for r in selected if modes[r.name] != 'ptq']
  first = [r for r in train_runs if not configs[r.name].quant.init_from]
  later = [r for r in train_runs if configs[r.name].quant.init_from]
  for group in (first, later):
    sweep_lib.execute(group, parallel=parallel, log=_log)
  for r in selected:
    done = os.path.exists(os.path.join(r.workdir, ptq.SUMMARY))
    if done:
      continue
    if modes[r.name] != 'ptq' and not sweep_lib.is_finished(r):
      _log(f'skip export of unfinished run {r.name}')
      continue
    _log(f'{"PTQ" if modes[r.name] == "ptq" else "export"}: {r.name}')
    try:
      recipe.quantize(configs[r.name], r.workdir)
    except Exception as e:  # pylint: disable=broad-except
      _log(f'failed: {r.name}: {type(e).__name__}: {" ".join(str(e).split())[:300]}')
  sweep_lib.collect(workdir, plan)
  text = write_table(workdir, plan, configs)
  _log(f'done in {time.time() - t0:.0f} s; {os.path.join(workdir, TABLE)}')
  return text


def _pct(x: float | None, ref: float | None) -> str:
  if x is None or ref is None:
    return ''
  return f'{100 * (x / ref - 1):+.2f}%'


def table_rows(workdir: str, plan: sweep_lib.Plan, configs) -> list[dict[str, Any]]:
  """One dict per run with a quant_summary.json (loss, reference, bytes...)."""
  rows = []
  for r in plan.runs:
    s = sweep_lib.read_json(os.path.join(r.workdir, ptq.SUMMARY))
    if not s:
      continue
    c = configs[r.name]
    rows.append({'name': c.name if 'name' in r.overrides else r.name, 'run': r.name,
                 'mode': c.quant.mode, 'init_from': c.quant.init_from,
                 'steps': 0 if c.quant.mode == 'ptq' else c.steps,
                 'setting': s['setting'], 'loss': s['eval_loss'],
                 'fakequant_loss': (s.get('fakequant_eval') or {}).get('loss'),
                 'float_loss': s['float_eval'].get('loss'),
                 'bytes': s['model_bytes']['total'], 'float_bytes': s['float_model_bytes']})
  floats = [x for x in rows if x['mode'] == 'none']
  for x in rows:
    if x['mode'] == 'ptq':
      x['ref_loss'], x['ref'] = x['float_loss'], 'its float source'
      continue
    same = [f for f in floats if f['init_from'] == x['init_from'] and f['steps'] == x['steps']]
    if same:
      x['ref_loss'], x['ref'] = same[0]['loss'], same[0]['name']
    else:
      x['ref_loss'], x['ref'] = None, ''
  return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
  head = ('| run | mode | setting | train steps | eval loss | Δ loss vs ref | perplexity '
          '| Δ ppl vs ref | model bytes | vs float32 | reference |')
  lines = [head, '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
  for x in rows:
    mode = {'none': 'float', 'qat': 'QAT ' + ('fine-tune' if x['init_from'] else 'scratch'),
            'ptq': 'PTQ'}[x['mode']]
    if x['mode'] == 'none' and x['init_from']:
      mode = 'float fine-tune'
    ppl = math.exp(x['loss'])
    ref_ppl = math.exp(x['ref_loss']) if x['ref_loss'] is not None else None
    dl = '' if x['ref_loss'] is None else (
        f'{x["loss"] - x["ref_loss"]:+.4f} ({_pct(x["loss"], x["ref_loss"])})')
    lines.append(
        f'| {x["name"]} | {mode} | {x["setting"]} | {x["steps"]} | {x["loss"]:.4f} | {dl} '
        f'| {ppl:.3f} | {_pct(ppl, ref_ppl)} | {x["bytes"]:,} '
        f'| {x["float_bytes"] / x["bytes"]:.2f}x smaller | {x["ref"]} |')
  diffs = [abs(x['loss'] - x['fakequant_loss']) for x in rows
           if x['fakequant_loss'] is not None]
  notes = ['', 'eval loss: nats/byte on the held-out split, evaluated from the exported '
           'integer weights (float runs: float32).']
  if diffs:
    notes.append(f'Integer-export vs fake-quant eval loss: max |difference| '
                 f'{max(diffs):.2e} over {len(diffs)} quantized runs.')
  return '\n'.join(lines + notes) + '\n'


def write_table(workdir: str, plan: sweep_lib.Plan, configs) -> str:
  rows = table_rows(workdir, plan, configs)
  text = '# Quantization ablation\n\n' + f'Config `{plan.config}`.\n\n' + to_markdown(rows)
  with open(os.path.join(workdir, TABLE), 'w') as f:
    f.write(text)
  return text
