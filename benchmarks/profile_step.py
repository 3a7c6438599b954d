r"""Where our train step's time goes: a jax.profiler trace of it, summed by XLA op.

  python -m benchmarks.profile_step --config=experiments/pretrain/small.py \
      [--shape=4x128] [--steps=3] [--out_dir=/tmp/profile] [--top=25]

Builds the step exactly as ``launch.benchmark`` does (the config with the GPT-2 block
and the ``--shape`` preset, as in the side-by-side harness), times it, then traces
``--steps`` more steps with ``jax.profiler.trace(..., create_perfetto_trace=True)``
and sums the durations of the trace's XLA events by name (fusions, dots, custom
calls; the names are the compiled HLO's, e.g. ``ynn_fusion.3``, ``loop_fusion.3``),
each described from the compiled HLO (``train_step.hlo.txt``: output shape, the dots
with operand shapes and the other ops inside). Prints the top ones with their share
of the traced op time, grouped also by kind (matmul: any op containing a dot; fusion;
copy/transpose; other), and writes ``summary.json`` in
``--out_dir``. The trace itself (``*.trace.json.gz``, ``*.xplane.pb``) opens in
Perfetto or TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Any

_SKIP = re.compile(r'^(\$|Thunk|ThreadPool|ThreadpoolListener|PjRt|Execute|ExecuteHelper|jit_|np\.|'
                   r'TfrtCpu|Cpu|XlaModule|ProfilerSession|transfer|Wait)')


def _kind(name: str, hlo: str = '') -> str:
  n = name.lower()
  if 'dot' in n or 'gemm' in n or 'matmul' in n or 'conv' in n or 'dot ' in hlo:
    return 'matmul'
  if 'transpose' in n or 'copy' in n:
    return 'copy/transpose'
  if 'fusion' in n:
    return 'fusion (elementwise/reduce)'
  if 'reduce' in n or 'scatter' in n or 'gather' in n or 'select' in n:
    return 'reduce/gather/scatter'
  return 'other'


_DEF = re.compile(r'^\s*(?:ROOT )?%([\w.-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\((.*)$')
_COMP = re.compile(r'^(?:ENTRY )?%([\w.-]+) .*\{\s*$')
_BORING = {'parameter', 'constant', 'bitcast', 'broadcast', 'reshape', 'get-tuple-element',
           'tuple', 'iota', 'convert', 'slice', 'dynamic-slice', 'copy'}


def describe_ops(hlo_text: str) -> dict[str, str]:
  """``op name -> 'shape: what it computes'`` from an optimized HLO module's text.

  For a fusion: its output shape, the ops inside (dots with their operand shapes
  first; the rest by kind, boring ones left out) and the called computation's name.
  """
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  defs: dict[str, tuple[str, str, str]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      comps[current] = []
      continue
    d = _DEF.match(line)
    if d and current is not None:
      name, shape, op, rest = d.groups()
      comps[current].append((name, shape, op, rest))
      defs[name] = (shape, op, rest)

  def inside(comp: str, depth: int = 0) -> list[str]:
    parts = []
    shapes = {n: sh for n, sh, _, _ in comps.get(comp, [])}
    for name, shape, op, rest in comps.get(comp, []):
      if op == 'dot':
        args = re.findall(r'%([\w.-]+)', rest.split(')')[0])
        parts.append('dot ' + ' x '.join(shapes.get(a, '?').split('{')[0] for a in args)
                     + f' -> {shape}')
      elif op == 'fusion' and depth < 2:
        called = re.search(r'calls=%([\w.-]+)', rest)
        if called:
          parts.extend(inside(called.group(1), depth + 1))
      elif op not in _BORING:
        parts.append(op)
    return parts

  out = {}
  for name, (shape, op, rest) in defs.items():
    called = re.search(r'calls=%([\w.-]+)', rest)
    if op == 'fusion' and called:
      ops = inside(called.group(1))
      dots = [o for o in ops if o.startswith('dot')]
      others = collections.Counter(o for o in ops if not o.startswith('dot'))
      desc = '; '.join(dots + [f'{k}x{v}' if v > 1 else k for k, v in others.most_common(8)])
      out[name] = f'{shape}: {desc or "(data movement)"}'
    else:
      out[name] = f'{shape}: {op}'
  return out


def summarize_trace(out_dir: str, top: int = 25) -> dict[str, Any]:
  """Sums complete ('X') events of the newest Perfetto trace under ``out_dir`` by name.

  Only leaf XLA op events are kept: host-side wrappers (``Thunk...``, ``PjRt...``,
  Python frames) and the thread pool's zero-length markers (``ThreadpoolListener::*``,
  which sit inside every parallel op and would otherwise hide it) are dropped by name,
  and an event that encloses another on the same thread is not counted twice (only the
  innermost events are summed). The total is op time summed over XLA's threads.
  """
  paths = sorted(glob.glob(os.path.join(out_dir, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {out_dir}')
  with gzip.open(paths[-1], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  by_thread: dict[tuple, list] = collections.defaultdict(list)
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    name = e.get('name', '')
    if not name or _SKIP.match(name) or name.endswith('.py') or ' ' in name:
      continue
    by_thread[(e.get('pid'), e.get('tid'))].append((float(e['ts']), float(e['dur']), name))
  totals: dict[str, float] = collections.Counter()
  counts: dict[str, int] = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda x: (x[0], -x[1]))
    for i, (ts, dur, name) in enumerate(evs):
      nxt = evs[i + 1] if i + 1 < len(evs) else None
      if nxt is not None and nxt[0] < ts + dur and nxt[0] + nxt[1] <= ts + dur:
        continue  # Encloses the next event: count the inner ones.
      totals[name] += dur
      counts[name] += 1
  total = sum(totals.values()) or 1.0
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])
  hlo_path = os.path.join(out_dir, 'train_step.hlo.txt')
  described = {}
  if os.path.exists(hlo_path):
    with open(hlo_path) as f:
      described = describe_ops(f.read())
  kinds: dict[str, float] = collections.Counter()
  for name, d in totals.items():
    kinds[_kind(name, described.get(name, ''))] += d
  return {
      'trace': paths[-1], 'total_op_us': total,
      'by_kind': {k: {'us': v, 'share': v / total} for k, v in
                  sorted(kinds.items(), key=lambda kv: -kv[1])},
      'top_ops': [{'name': n, 'us': d, 'share': d / total, 'calls': counts[n],
                   'hlo': described.get(n, '')} for n, d in ranked[:top]],
  }


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description='Profile our train step (see module doc).')
  p.add_argument('--config', default='experiments/pretrain/small.py')
  p.add_argument('--shape', default='')
  p.add_argument('--gpt2_block', type=int, default=1)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--out_dir', default='/tmp/profile_step')
  p.add_argument('--top', type=int, default=25)
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  a = p.parse_args(argv)
  import ast

  from benchmarks.side_by_side import GPT2_BLOCK, SHAPES
  from research import recipe
  from research.benchmark import run_benchmark
  from research.config import override
  config = recipe.load_config(a.config, '--config')
  extra = {}
  for kv in a.set:
    k, v = kv.split('=', 1)
    try:
      extra[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      extra[k] = v
  override(config, {**(GPT2_BLOCK if a.gpt2_block else {}), **SHAPES[a.shape], **extra})
  os.makedirs(a.out_dir, exist_ok=True)
  report = run_benchmark(config, steps=5, warmup=2, measure_roofline=False,
                         profile_dir=a.out_dir, profile_steps=a.steps)
  summary = summarize_trace(a.out_dir, a.top)
  summary['benchmark'] = {k: report[k] for k in ('step_time_s', 'tokens_per_sec', 'compile_s',
                                                 'backend_defaults', 'batch_size', 'seq_len')}
  summary['traced_steps'] = a.steps
  with open(os.path.join(a.out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f"step {report['step_time_s']:.4f}s (untraced median); traced {a.steps} steps, "
        f"{summary['total_op_us'] / 1e3 / a.steps:.1f} ms of XLA op time per step, summed over "
        f"the threads")
  for k, v in summary['by_kind'].items():
    print(f'  {k:30} {100 * v["share"]:5.1f}%')
  for row in summary['top_ops']:
    print(f"  {row['name'][:34]:34} {100 * row['share']:5.1f}%  {row['calls']:3} calls  "
          f"{row['hlo'][:150]}")


if __name__ == '__main__':
  main()
