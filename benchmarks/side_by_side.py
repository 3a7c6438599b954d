r"""Side-by-side speed of our train step and a PyTorch reference of the same shape.

  python -m launch.benchmark --against=torch --config=experiments/pretrain/small.py \
      [--shape=4x128] [--repeats=3] [--steps=10] [--cores=0,1 | --threads=N] \
      [--out=side_by_side.json] [--config.KEY=VALUE ...]

(``python -m benchmarks.side_by_side`` takes the same flags.) Each repeat runs ours,
then the reference (A B A B ...), each in a fresh subprocess pinned to the same cores
(``sched_setaffinity`` before ``exec``) with the same thread count: XLA's CPU client
sizes its thread pool from the affinity mask, torch gets ``set_num_threads`` and
``OMP_NUM_THREADS``. Nothing is fetched: the reference is ``benchmarks/torch_gpt.py``.

Our side is ``python -m launch.benchmark`` on the config as a user runs it, with the
GPT-2 block settings (:data:`GPT2_BLOCK`: GELU 4x MLP, LayerNorm, learned positions,
tied embeddings) and the ``--shape`` preset's sizes applied as ``--config.*``
overrides, then the user's own overrides. The reference is built from the shape our
child reports (layers, heads, width, MLP, vocabulary and its padding, positions
table, norm epsilon, biases, batch, sequence, AdamW settings), so the two cannot drift.

Reported per side (median and range over repeats): tokens/s (batch x seq / median
step time), CPU seconds per step (``getrusage`` of the child over its timed steps;
also the child's whole-life CPU from ``wait4``), time to first step (from the
parent's ``Popen`` to the end of the first step: imports, init, compile; ours gets a
persistent compilation cache of the harness's own, so repeat 0 is a cold start and
later repeats are warm ones, reported apart), MFU against
the roofline our child measured in its own process on the same cores; the paired
ratios ours / reference of each repeat; the 1-minute load average before and after.
Not a test: nothing asserts on time. Timings on a loaded machine are meaningless;
the report says what the load was.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Our model with GPT-2's block (what benchmarks/torch_gpt.py implements).
GPT2_BLOCK: dict[str, Any] = {
    'model.mlp_kind': 'gelu', 'model.mlp_dim': 0, 'model.norm': 'layernorm',
    'model.positions': 'learned', 'model.tie_embeddings': True, 'model.dropout': 0.0,
}
# Sizes of the two shapes (nanoGPT's Shakespeare-char and its CPU example).
SHAPES: dict[str, dict[str, Any]] = {
    '': {},
    'small': {'model.num_layers': 6, 'model.d_model': 384, 'model.num_heads': 6,
              'seq_len': 256},  # small.py's own sizes (batch_size 32).
    '4x128': {'model.num_layers': 4, 'model.d_model': 128, 'model.num_heads': 4,
              'model.max_seq_len': 64, 'seq_len': 64, 'batch_size': 12},
}


class SideBySideError(Exception):
  """A bad harness argument; the message is one line."""


def parse_cores(cores: str, threads: int) -> list[int]:
  """The cores both children are pinned to: ``--cores``, else the first ``--threads``
  cores this process may use, else all of them. XLA cannot be given a thread count
  other than its core count, so ``--threads`` must equal the number of cores."""
  allowed = sorted(os.sched_getaffinity(0))
  if cores:
    try:
      chosen = sorted({int(c) for c in cores.split(',') if c.strip()})
    except ValueError:
      raise SideBySideError(f'--cores={cores!r} must be a comma-separated list of core '
                            f'numbers, e.g. --cores=0,1.') from None
    if not chosen or set(chosen) - set(allowed):
      raise SideBySideError(f'--cores={cores!r} must be among the cores this process may '
                            f'use: {allowed}.')
  else:
    chosen = allowed[:threads] if threads else allowed
  if threads and threads != len(chosen):
    raise SideBySideError(f'--threads={threads} differs from the {len(chosen)} pinned cores '
                          f'{chosen}: XLA uses one thread per allowed core, so give '
                          f'--threads={len(chosen)} or --cores with {threads} cores.')
  if threads and threads > len(allowed):
    raise SideBySideError(f'--threads={threads} exceeds the {len(allowed)} cores available.')
  return chosen


def _flag_value(v: Any) -> str:
  return str(v)


def override_flags(shape: str, gpt2_block: bool, user_config_flags: list[str]) -> list[str]:
  """``--config=...`` first, then the block and shape overrides, then the user's
  ``--config.KEY=VALUE`` (absl keeps the last value of a repeated flag: the user wins)."""
  if shape not in SHAPES:
    raise SideBySideError(f'--shape={shape!r} is unknown; use one of {sorted(SHAPES)}.')
  main = [f for f in user_config_flags if f.startswith('--config=')]
  if not main:
    raise SideBySideError('--config=experiments/...py[:arg] is required.')
  rest = [f for f in user_config_flags if not f.startswith('--config=')]
  preset = {**(GPT2_BLOCK if gpt2_block else {}), **SHAPES[shape]}
  return main + [f'--config.{k}={_flag_value(v)}' for k, v in preset.items()] + rest


def child_env(threads: int, jax_cache: str = '') -> dict[str, str]:
  """Ours chooses its CPU devices as a user's run does (no fake-device flag inherited
  from a test run: research/backend_defaults.py gives it one per pinned core), the
  thread count for torch's OpenMP/MKL pools, and ours' persistent compilation cache."""
  from research.backend_defaults import xla_flags_with_cpu_devices
  env = dict(os.environ)
  if jax_cache:
    env['JAX_COMPILATION_CACHE_DIR'] = jax_cache
  xla = xla_flags_with_cpu_devices(env.get('XLA_FLAGS', ''), None)
  if xla:
    env['XLA_FLAGS'] = xla
  else:
    env.pop('XLA_FLAGS', None)
  env['JAX_PLATFORMS'] = 'cpu'
  for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    env[k] = str(threads)
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def run_child(cmd: list[str], cores: list[int], threads: int, out_path: str,
              log_path: str, jax_cache: str = '') -> dict[str, Any]:
  """Runs one pinned child; returns its JSON report plus the parent's measurements."""
  started = time.time()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd + [f'--started_unix={started!r}'], cwd=REPO,
                            env=child_env(threads, jax_cache), stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.time() - started
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise SideBySideError(f'child {cmd[2]} exited {proc.returncode}; log {log_path}: '
                          + ' | '.join(tail.strip().splitlines()[-5:]))
  with open(out_path) as f:
    report = json.load(f)
  report['child_cpu_s_total'] = ru.ru_utime + ru.ru_stime
  report['child_max_rss_mb'] = ru.ru_maxrss / 1024
  report['child_wall_s'] = wall
  report['time_to_first_step_s'] = report['first_step_done_unix'] - started
  report['started_unix'] = started
  return report


def torch_spec(ours: dict[str, Any]) -> dict[str, Any]:
  """The reference's shape and optimizer from our child's resolved config."""
  m = ours['model']
  if (m['mlp_kind'], m['norm'], m['positions'], m['tie_embeddings']) != (
      'gelu', 'layernorm', 'learned', True):
    raise SideBySideError(
        'the PyTorch reference has the GPT-2 block only (gelu, layernorm, learned positions, '
        f'tied embeddings); our config resolved to {m["mlp_kind"]}, {m["norm"]}, '
        f'{m["positions"]}, tie_embeddings={m["tie_embeddings"]}: keep --gpt2_block=True.')
  if m['head_dim'] * m['num_heads'] != m['d_model'] or m['num_kv_heads'] != m['num_heads']:
    raise SideBySideError('the PyTorch reference needs head_dim * num_heads == d_model and '
                          'num_kv_heads == num_heads (GPT-2 attention).')
  o = m['optimizer']
  # Micro-batches that backend defaults chose (research/backend_defaults.py) are how our
  # step runs the same full-batch update, not a different update: the reference takes
  # the whole batch at once.
  chosen = ours.get('backend_defaults', {}).get('optimizer.grad_accum_steps')
  if o['name'] != 'adamw' or (o['grad_accum_steps'] != 1 and o['grad_accum_steps'] != chosen):
    raise SideBySideError(f'the PyTorch reference trains with AdamW and no gradient '
                          f'accumulation; our config has optimizer.name={o["name"]!r}, '
                          f'grad_accum_steps={o["grad_accum_steps"]}.')
  return {'n_layer': m['num_layers'], 'n_head': m['num_heads'], 'd_model': m['d_model'],
          'mlp_dim': m['mlp_dim'], 'max_seq_len': m['max_seq_len'],
          'vocab_size': m['vocab_size'], 'padded_vocab': m['padded_vocab_size'],
          'seq_len': ours['seq_len'], 'batch_size': ours['batch_size'],
          'norm_eps': m['norm_eps'], 'bias': m['use_bias'], 'init_std': m['init_std'],
          'learning_rate': o['learning_rate'], 'b1': o['b1'], 'b2': o['b2'], 'eps': o['eps'],
          'weight_decay': o['weight_decay'], 'clip_norm': o['clip_norm']}


def _stats(values: list[float]) -> dict[str, float]:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def _side_row(r: dict[str, Any], tokens: int, flops_per_token: float,
              peak: float) -> dict[str, float]:
  step = statistics.median(r['step_times_s'])
  return {'step_time_s': step, 'tokens_per_sec': tokens / step,
          'cpu_s_per_step': r['cpu_s_per_step'], 'time_to_first_step_s': r['time_to_first_step_s'],
          'child_cpu_s_total': r['child_cpu_s_total'], 'child_max_rss_mb': r['child_max_rss_mb'],
          'mfu': tokens * flops_per_token / step / peak}


def summarize(ours_runs: list[dict[str, Any]], torch_runs: list[dict[str, Any]]
              ) -> dict[str, Any]:
  """Per side median/range over repeats, and the per-repeat paired ratios ours/torch."""
  first = ours_runs[0]
  tokens = first['batch_size'] * first['seq_len']
  fpt = first['model_flops_per_token']
  rows = {'ours': [], 'torch': []}
  for o, t in zip(ours_runs, torch_runs):
    peak = o['peak_flops_total']  # Same cores, measured seconds before the torch child.
    rows['ours'].append(_side_row(o, tokens, fpt, peak))
    rows['torch'].append(_side_row(t, tokens, fpt, peak))
  out: dict[str, Any] = {}
  for side, rs in rows.items():
    out[side] = {k: _stats([r[k] for r in rs]) for k in rs[0]}
  pairs = list(zip(rows['ours'], rows['torch']))
  out['ratio_ours_over_torch'] = {
      'tokens_per_sec': _stats([o['tokens_per_sec'] / t['tokens_per_sec'] for o, t in pairs]),
      'cpu_s_per_step': _stats([o['cpu_s_per_step'] / t['cpu_s_per_step'] for o, t in pairs]),
      'time_to_first_step_s': _stats([o['time_to_first_step_s'] / t['time_to_first_step_s']
                                      for o, t in pairs]),
  }
  out['roofline_flops'] = _stats([o['peak_flops_total'] for o in ours_runs])
  # Time to first step: ours' repeat 0 compiles, later repeats hit the compilation cache.
  out['time_to_first_step_s'] = {
      'ours_cold': rows['ours'][0]['time_to_first_step_s'],
      'torch_first': rows['torch'][0]['time_to_first_step_s'],
      'ours_warm': (_stats([r['time_to_first_step_s'] for r in rows['ours'][1:]])
                    if len(rows['ours']) > 1 else None),
      'torch_later': (_stats([r['time_to_first_step_s'] for r in rows['torch'][1:]])
                      if len(rows['torch']) > 1 else None),
  }
  return out


def run(config_flags: list[str], *, shape: str = '', gpt2_block: bool = True,
        repeats: int = 3, steps: int = 10, warmup: int = 2, threads: int = 0,
        cores: str = '', out: str = 'side_by_side.json', keep_dir: str = '') -> dict[str, Any]:
  """The harness (see the module doc). Returns the report and writes it to ``out``."""
  if repeats < 1 or steps < 1:
    raise SideBySideError('--repeats and --steps must be >= 1.')
  pinned = parse_cores(cores, threads)
  n_threads = len(pinned)
  flags = override_flags(shape, gpt2_block, config_flags)
  work = keep_dir or tempfile.mkdtemp(prefix='side_by_side_')
  os.makedirs(work, exist_ok=True)
  load_before = os.getloadavg()
  t_start = time.time()
  ours_runs, torch_runs, spec = [], [], None
  for i in range(repeats):
    o_out = os.path.join(work, f'ours_{i}.json')
    ours_cmd = [sys.executable, '-m', 'launch.benchmark', *flags, f'--steps={steps}',
                f'--warmup={warmup}', f'--out={o_out}']
    # A cache of this harness's own: repeat 0 compiles (cold), later repeats load the
    # executable (warm), as a user's first and later runs do.
    ours_runs.append(run_child(ours_cmd, pinned, n_threads, o_out,
                               os.path.join(work, f'ours_{i}.log'),
                               jax_cache=os.path.join(work, 'jax_cache')))
    ours_runs[-1]['compilation_cache'] = 'cold' if i == 0 else 'warm'
    if spec is None:
      spec = torch_spec(ours_runs[0])
      with open(os.path.join(work, 'torch_spec.json'), 'w') as f:
        json.dump(spec, f)
    t_out = os.path.join(work, f'torch_{i}.json')
    torch_cmd = [sys.executable, '-m', 'benchmarks.torch_gpt',
                 f'--spec={os.path.join(work, "torch_spec.json")}', f'--steps={steps}',
                 f'--warmup={warmup}', f'--threads={n_threads}', f'--out={t_out}']
    torch_runs.append(run_child(torch_cmd, pinned, n_threads, t_out,
                                os.path.join(work, f'torch_{i}.log')))
  load_after = os.getloadavg()
  first = ours_runs[0]
  report = {
      'what': 'ours (launch.benchmark) vs PyTorch reference (benchmarks/torch_gpt.py), '
              'interleaved A B A B, each a fresh subprocess pinned to the same cores',
      'command': ' '.join([sys.executable, '-m', 'launch.benchmark', '--against=torch',
                           *config_flags, f'--shape={shape}', f'--repeats={repeats}',
                           f'--steps={steps}', f'--cores={",".join(map(str, pinned))}']),
      'our_flags': flags, 'cores': pinned, 'threads': n_threads, 'repeats': repeats,
      'steps': steps, 'warmup': warmup,
      'load_average_before': load_before, 'load_average_after': load_after,
      'wall_s': time.time() - t_start,
      'shape': {'num_layers': first['model']['num_layers'], 'd_model': first['model']['d_model'],
                'num_heads': first['model']['num_heads'], 'seq_len': first['seq_len'],
                'batch_size': first['batch_size'], 'vocab_size': first['model']['vocab_size'],
                'param_count': first['param_count']},
      'torch_spec': spec,
      'mfu_method': ('model FLOPs per token (6N + 12 L d T, PaLM) x tokens/s, over the '
                     'roofline our child measured in its own process: '
                     + (first.get('roofline') or {}).get('method', first['peak_flops_source'])),
      'summary': summarize(ours_runs, torch_runs),
      'runs': {'ours': ours_runs, 'torch': torch_runs},
      'logs': work,
  }
  with open(out, 'w') as f:
    json.dump(report, f, indent=2)
  return report


def format_table(report: dict[str, Any]) -> str:
  s = report['summary']
  lines = [f"shape {report['shape']}  cores {report['cores']}  repeats {report['repeats']}  "
           f"load avg before {report['load_average_before'][0]:.2f} after "
           f"{report['load_average_after'][0]:.2f}",
           f"{'':24}{'ours':>28}{'torch':>28}{'ours/torch':>28}"]
  def cell(d, fmt):
    return f"{format(d['median'], fmt)} [{format(d['min'], fmt)}-{format(d['max'], fmt)}]"
  for key, fmt in (('tokens_per_sec', '.0f'), ('cpu_s_per_step', '.4f'),
                   ('time_to_first_step_s', '.2f'), ('mfu', '.3f')):
    ratio = s['ratio_ours_over_torch'].get(key)
    lines.append(f'{key:24}{cell(s["ours"][key], fmt):>28}{cell(s["torch"][key], fmt):>28}'
                 f'{cell(ratio, ".3f") if ratio else "":>28}')
  t = s['time_to_first_step_s']
  lines.append(f"time to first step: ours cold {t['ours_cold']:.2f}s, torch "
               f"{t['torch_first']:.2f}s" + (
                   f"; ours warm (compilation cache) {t['ours_warm']['median']:.2f}s, torch "
                   f"{t['torch_later']['median']:.2f}s" if t['ours_warm'] else ''))
  return '\n'.join(lines)


if __name__ == '__main__':
  # Same flags as launch.benchmark, with --against=torch.
  sys.argv.insert(1, '--against=torch')
  from launch import benchmark as _launch
  _launch.entry()
