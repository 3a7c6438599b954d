r"""The compression comparison in one command: distillation, pruning, quantization.

  python -m research.compress.ablation --workdir=DIR [--smoke] [--pretrain_steps=400]
      [--student_steps=400] [--prune_steps=200]

Runs (in this process, each in ``DIR/<name>/``; a rerun skips finished runs):

1. ``baseline``: the ``tiny`` float LM (d_model 128, 2 layers, byte tokenizer, stdlib
   corpus; experiments/compress/distill_teacher.py). It is also the teacher.
2. ``student-scratch`` / ``student-distill-a0.5`` / ``student-distill-a0.9``: a
   d_model 64 student (experiments/compress/distill.py), alpha 0 (from scratch) or
   distilled from the baseline with T=2.
3. ``baseline-ft`` (no pruning: the reference of the pruned runs),
   ``prune-magnitude-{0.5,0.75,0.9}`` (cubic schedule), ``prune-2:4``,
   ``prune-structured`` (0.5 of heads and MLP neurons): the baseline fine-tuned ``prune_steps`` while
   pruning (experiments/compress/prune.py); the structured run is exported to a real
   smaller model (``prune-structured/export``) and evaluated from it.
4. ``ptq-int8`` / ``ptq-int4``: weight-only PTQ of the baseline (research/quant).

Writes ``DIR/compress_results.md``: eval loss (nats/byte, the held-out split), gap vs
the baseline, parameters (nonzero for pruned runs) and model bytes (float32; pruned:
the effective bytes of the sparse format of research/compress/prune.py
``sparse_bytes``; structured: the exported model; PTQ: packed integers + scales +
float embeddings). Exit code 1 if a run failed (the table is still written).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import ml_collections
from absl import app, flags, logging

TABLE = 'compress_results.md'
DENSE_FT = 'baseline-ft'  # Same extra steps as the pruned runs, no pruning.


def _read_json(path: str) -> dict[str, Any]:
  from research.sweep import read_json
  return read_json(path) or {}


def _log(msg: str) -> None:
  print(f'[compress] {msg}', flush=True)


def plan(workdir: str, smoke: bool, pretrain_steps: int, student_steps: int,
         prune_steps: int) -> list[tuple[str, str, ml_collections.ConfigDict]]:
  """[(name, kind, config)], in dependency order."""
  from experiments.compress import distill as distill_exp
  from experiments.compress import distill_teacher
  from experiments.compress import prune as prune_exp
  from research.config import override
  s = ',smoke=True' if smoke else ''
  base_dir = os.path.join(workdir, 'baseline')
  runs = [('baseline', 'train',
           distill_teacher.get_config(f'teacher_steps={pretrain_steps}{s}'))]
  alphas = (0.9,) if smoke else (0.5, 0.9)
  for alpha in (0.0,) + alphas:
    c = distill_exp.get_config(f'steps={student_steps}{s}')
    c.distill.teacher, c.distill.teacher_config = base_dir, ''
    c.distill.alpha = alpha
    name = 'student-scratch' if alpha == 0 else f'student-distill-a{alpha}'
    c.name = name
    runs.append((name, 'train', c))
  magnitude = (0.75,) if smoke else (0.5, 0.75, 0.9)
  pruned = [(f'prune-magnitude-{sp:g}', {'prune.method': 'magnitude', 'prune.sparsity': sp})
            for sp in magnitude]
  pruned += [('prune-2:4', {'prune.method': 'nm'}),
             ('prune-structured', {'prune.method': 'structured', 'prune.sparsity': 0.5})]
  # The pruned runs' reference: the baseline trained the same extra steps, unpruned.
  reference = [] if smoke else [(DENSE_FT, {'prune.method': 'none'})]
  for name, keys in reference + pruned:
    c = prune_exp.get_config(f'steps={prune_steps}{s}')
    override(c, keys)
    c.name = name
    c.finetune.init_from = base_dir
    runs.append((name, 'train', c))
  for bits in (8, 4):
    c = distill_teacher.get_config(f'teacher_steps={pretrain_steps}{s}')
    c.name = f'ptq-int{bits}'
    c.quant.mode, c.quant.init_from, c.quant.weight_bits = 'ptq', base_dir, bits
    c.eval_steps = distill_exp.get_config(s.lstrip(',') or None).eval_steps
    runs.append((c.name, 'ptq', c))
  return runs


def _dense_bytes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Float parameter count/bytes of the config's plain model (abstract: no allocation)."""
  from flax import nnx

  from research.compress.export import param_bytes
  from research.tasks import make_task
  c = ml_collections.ConfigDict(config.to_dict())
  c.distill.teacher, c.prune.method = '', 'none'
  c.finetune.init_from = ''
  c.quant.mode = 'none'
  if not c.model.vocab_size:
    c.model.vocab_size = 259
  model = nnx.eval_shape(lambda: make_task(c).build_model())
  return param_bytes(model)


def _eval_export(export_dir: str) -> dict[str, float]:
  from research import recipe
  from research import sharding as shd
  from research.data import tokenizers
  from research.evaluate import evaluate_model
  from research.tasks import make_task
  model, config, _ = recipe.load_run_model(export_dir)
  mesh = shd.mesh_from_config(config.mesh)
  tokenizer = tokenizers.make_tokenizer(config.data, export_dir)
  return evaluate_model(config, make_task(config), tokenizer, model, mesh)


def execute(workdir: str, runs) -> dict[str, str]:
  """Runs what is not finished; returns {name: 'ok' | 'failed: ...'}."""
  from research import recipe
  from research.compress import export as export_lib
  from research.quant import ptq
  status = {}
  for name, kind, config in runs:
    d = os.path.join(workdir, name)
    done = os.path.join(d, ptq.SUMMARY if kind == 'ptq' else 'summary.json')
    if os.path.exists(done):
      status[name] = 'ok'
      continue
    _log(f'{kind}: {name}')
    t = time.time()
    try:
      if kind == 'ptq':
        recipe.quantize(config, d)
      else:
        recipe.run(config, d)
      status[name] = 'ok'
      _log(f'{name} done in {time.time() - t:.0f} s')
    except Exception as e:  # pylint: disable=broad-except
      status[name] = f'failed: {type(e).__name__}: {" ".join(str(e).split())[:200]}'
      _log(f'{name} {status[name]}')
      traceback.print_exc()
  d = os.path.join(workdir, 'prune-structured')
  out = os.path.join(d, 'export')
  if status.get('prune-structured') == 'ok' and not os.path.exists(
      os.path.join(out, 'eval.json')):
    try:
      summary = export_lib.export(d, out)
      ev = _eval_export(out)
      with open(os.path.join(out, 'eval.json'), 'w') as f:
        json.dump({**summary, 'eval': ev}, f, indent=2)
    except Exception as e:  # pylint: disable=broad-except
      status['prune-structured'] = f'export failed: {type(e).__name__}: {e}'
      traceback.print_exc()
  return status


def rows(workdir: str, runs, status: dict[str, str]) -> list[dict[str, Any]]:
  from research.quant import ptq
  out = []
  for name, kind, config in runs:
    d = os.path.join(workdir, name)
    row = {'name': name, 'status': status.get(name, 'missing'), 'loss': None,
           'params': None, 'bytes': None, 'notes': ''}
    if kind == 'ptq':
      q = _read_json(os.path.join(d, ptq.SUMMARY))
      row.update(method=f'PTQ int{config.quant.weight_bits} weight-only '
                 f'({config.quant.granularity})', loss=q.get('eval_loss'),
                 bytes=(q.get('model_bytes') or {}).get('total'))
      row['params'] = _dense_bytes(config)['params']
      out.append(row)
      continue
    s = _read_json(os.path.join(d, 'summary.json'))
    row['loss'] = s.get('final_eval_loss')
    dense = _dense_bytes(config)
    row['params'], row['bytes'] = dense['params'], dense['bytes']
    m = config.model
    arch = f'd{m.d_model} L{m.num_layers} mlp{m.mlp_dim}'
    if name == 'baseline':
      row['method'] = f'float32 ({arch}; teacher)'
    elif name == DENSE_FT:
      row['method'] = f'float32, baseline + {config.steps} steps unpruned (pruning reference)'
    elif name.startswith('student'):
      a = config.distill.alpha
      row['method'] = (f'student {arch}, ' + ('from scratch' if a == 0 else
                       f'distilled alpha={a} T={config.distill.temperature}'))
    else:
      sp = _read_json(os.path.join(d, 'sparsity.json'))
      p = config.prune
      label = {'magnitude': f'magnitude {p.sparsity:g} (cubic, gradual)',
               'nm': f'{p.n}:{p.m} semi-structured',
               'structured': f'structured heads+MLP {p.sparsity:g}'}[p.method]
      row['method'] = f'pruned: {label}'
      if sp:
        row['params'] = sp['nonzero_params']
        row['bytes'] = sp['effective_bytes']
        row['notes'] = f'kernels {100 * sp["sparsity"]:.1f}% zero'
      if p.method == 'structured':
        ex = _read_json(os.path.join(d, 'export', 'eval.json'))
        if ex:
          row['bytes'], row['params'] = ex['bytes'], ex['params']
          ev = (ex.get('eval') or {}).get('loss')
          row['notes'] = (f'exported: {ex["num_heads"]} heads, mlp_dim {ex["mlp_dim"]}; '
                          f'export eval {ev:.4f}, max |Δlogit| {ex["max_abs_logit_diff"]:.1e}'
                          if ev is not None else row['notes'])
    out.append(row)
  return out


def to_markdown(table: list[dict[str, Any]]) -> str:
  base = next((r for r in table if r['name'] == 'baseline'), None)
  ref_loss = base['loss'] if base else None
  ref_bytes = base['bytes'] if base else None
  ft_loss = next((r['loss'] for r in table if r['name'] == DENSE_FT), None)
  lines = ['| run | method | eval loss | Δ vs baseline | params (nonzero) | model bytes '
           '| vs baseline | notes | status |', '|---|---|---:|---:|---:|---:|---:|---|---|']
  for r in table:
    loss = '' if r['loss'] is None else f'{r["loss"]:.4f}'
    gap = ''
    if r['loss'] is not None and ref_loss and r['name'] != 'baseline':
      gap = f'{r["loss"] - ref_loss:+.4f} ({100 * (r["loss"] / ref_loss - 1):+.1f}%)'
    if r['name'].startswith('prune') and r['loss'] is not None and ft_loss:
      gap += f'; vs {DENSE_FT} {r["loss"] - ft_loss:+.4f}'
    params = '' if r['params'] is None else f'{r["params"]:,}'
    nbytes = '' if r['bytes'] is None else f'{r["bytes"]:,}'
    ratio = (f'{r["bytes"] / ref_bytes:.2f}x' if r['bytes'] and ref_bytes else '')
    lines.append(f'| {r["name"]} | {r.get("method", "")} | {loss} | {gap} | {params} '
                 f'| {nbytes} | {ratio} | {r["notes"]} | {r["status"]} |')
  notes = [
      '', 'eval loss: nats/byte on the held-out split of the stdlib corpus (the trainer\'s '
      'final evaluation; PTQ: evaluated from the exported integer weights; structured: the '
      'masked model, the exported smaller model in notes).',
      'model bytes: float32 parameters incl. the padded embedding; pruned: nonzero values '
      '+ sparse-format metadata (magnitude: 1-bit bitmap, 2:4: 2 bits per kept value), '
      'structured: the exported smaller model; PTQ: bit-packed integers + scales + float '
      'embeddings.',
      f'Pruned runs are the baseline fine-tuned further while pruning; {DENSE_FT} is the '
      'baseline fine-tuned the same steps without pruning, the fair reference for them '
      f'("vs {DENSE_FT}").']
  return '\n'.join(lines + notes) + '\n'


def run(workdir: str, *, smoke: bool = False, pretrain_steps: int = 400,
        student_steps: int = 400, prune_steps: int = 200) -> int:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  runs = plan(workdir, smoke, pretrain_steps, student_steps, prune_steps)
  status = execute(workdir, runs)
  table = rows(workdir, runs, status)
  text = (f'# Compression comparison\n\nOne baseline (the teacher), distilled and scratch '
          f'students, pruning and PTQ; `python -m research.compress.ablation '
          f'--workdir={workdir}{" --smoke" if smoke else ""}`.\n\n' + to_markdown(table))
  path = os.path.join(workdir, TABLE)
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
  with open(os.path.join(workdir, 'compress_results.json'), 'w') as f:
    json.dump(table, f, indent=2)
  _log(f'done in {time.time() - t0:.0f} s; {path}')
  print(text, flush=True)
  bad = [n for n, s in status.items() if s != 'ok']
  if bad:
    print(f'error: {len(bad)} run(s) failed: {bad[0]}: {status[bad[0]]}', file=sys.stderr)
    return 1
  return 0


def main() -> None:
  workdir = flags.DEFINE_string('workdir', None, 'Ablation directory.')
  smoke = flags.DEFINE_boolean('smoke', False, 'Smoke sizes (seconds per run; tests).')
  pretrain_steps = flags.DEFINE_integer('pretrain_steps', 400, 'Baseline/teacher steps.')
  student_steps = flags.DEFINE_integer('student_steps', 400, 'Student steps.')
  prune_steps = flags.DEFINE_integer('prune_steps', 200, 'Pruning fine-tuning steps.')

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value:
      print('error: --workdir is required.', file=sys.stderr)
      sys.exit(1)
    logging.set_verbosity(logging.WARNING)
    sys.exit(run(workdir.value, smoke=smoke.value, pretrain_steps=pretrain_steps.value,
                 student_steps=student_steps.value, prune_steps=prune_steps.value))

  app.run(_main)


if __name__ == '__main__':
  main()
