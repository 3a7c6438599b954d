"""The checks behind ``python -m launch.gpu_check``: attention, precision, collectives, speed.

Each check returns a dict with ``status``: ``'pass'``, ``'fail'``, ``'fallback: why'``
(the model's dispatch does not send this case to cuDNN), or ``'skipped: why'``; and
its figures. :func:`run_all` gathers them with the machine's description into the
one JSON report. On CPU (no GPU) the cuDNN comparisons are ``'skipped: no GPU'``: that
is the product's behaviour there, while the XLA attention path is still checked against
a float32 reference and the other checks run at whatever size was asked for.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

H100_PEAK_BF16 = 989e12  # Dense bf16 FLOP/s of an H100/H200 SXM (the MFU denominator).
ATTN_RTOL = 2e-2  # bfloat16 inputs: cuDNN and XLA accumulate in float32, round differently.
LOSS_RTOL = 2e-2  # bfloat16 vs float32 compute: the loss agrees to ~3 significant digits.


def has_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def machine() -> dict[str, Any]:
  import os
  devs = jax.devices()
  out = {'jax_version': jax.__version__, 'platform': devs[0].platform,
         'device_kind': devs[0].device_kind, 'device_count': len(devs),
         'process_count': jax.process_count(),
         'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}
  if has_gpu():
    cc = getattr(devs[0], 'compute_capability', None)
    out['compute_capability'] = cc
    try:
      from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
      out['cudnn_version'] = int(check_cudnn_version())
    except Exception as e:  # noqa: BLE001 - reported, not raised.
      out['cudnn_version'] = f'unknown: {e}'
  return out


# --------------------------------------------------------------------------- attention


def attention_cases(smoke: bool) -> list[dict[str, Any]]:
  """The mask combinations the models use (decoder, encoder, packed documents)."""
  L = 16 if smoke else 512
  B, N, H = 2, 4 if smoke else 16, 32 if smoke else 128
  return [
      {'name': 'causal', 'B': B, 'L': L, 'N': N, 'K': N, 'H': H, 'causal': True},
      {'name': 'padding_causal', 'B': B, 'L': L, 'N': N, 'K': N, 'H': H, 'causal': True,
       'lengths': (L, L - L // 3)},
      {'name': 'padding_bidirectional', 'B': B, 'L': L, 'N': N, 'K': N, 'H': H,
       'causal': False, 'lengths': (L - 5, L // 2)},
      {'name': 'gqa_causal', 'B': B, 'L': L, 'N': N, 'K': max(N // 4, 1), 'H': H, 'causal': True},
      {'name': 'sliding_window', 'B': B, 'L': L, 'N': N, 'K': N, 'H': H, 'causal': True,
       'window': L // 4},
      {'name': 'segment_ids', 'B': B, 'L': L, 'N': N, 'K': N, 'H': H, 'causal': True,
       'segments': (L // 3, L // 2)},
  ]


def _case_inputs(case: dict[str, Any], dtype):
  key = jax.random.key(0)
  kq, kk, kv, kg = jax.random.split(key, 4)
  B, L, N, K, H = case['B'], case['L'], case['N'], case['K'], case['H']
  q = jax.random.normal(kq, (B, L, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, L, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, L, K, H), jnp.float32).astype(dtype)
  g = jax.random.normal(kg, (B, L, N, H), jnp.float32)
  mask = seg = None
  rows = jnp.ones((B, L), bool)
  if 'lengths' in case:  # Right padding, as every batch builder here produces.
    mask = (jnp.arange(L)[None, :] < jnp.asarray(case['lengths'])[:, None]).astype(jnp.int32)
    rows = mask.astype(bool)
  if 'segments' in case:  # Two packed documents per row, split at the given index.
    seg = (jnp.arange(L)[None, :] >= jnp.asarray(case['segments'])[:, None]).astype(jnp.int32) + 1
  return q, k, v, g, mask, seg, rows


def _attend(impl: str, case, q, k, v, mask, seg):
  from research.models.attention import plan_attention
  plan = plan_attention(impl, causal=case['causal'], seq_len=case['L'],
                        window=case.get('window', 0), mask_BL=mask, segment_ids_BL=seg)
  out = jax.nn.dot_product_attention(q, k, v, **plan.kwargs, implementation=plan.implementation)
  return out, plan


def _reference(case, q, k, v, mask, seg):
  """Float32 softmax attention with an explicit boolean mask (the definition)."""
  from research.models.attention import attention_mask
  L = case['L']
  idx = jnp.arange(L)
  ok = attention_mask(idx, idx, causal=case['causal'], window=case.get('window', 0),
                      mask_BS=mask, q_segment_BL=seg, k_segment_BS=seg)  # [B|1, 1, L, S]
  rep = q.shape[2] // k.shape[2]
  kf = jnp.repeat(k.astype(jnp.float32), rep, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), rep, axis=2)
  logits = jnp.einsum('blnh,bsnh->bnls', q.astype(jnp.float32), kf) / math.sqrt(q.shape[-1])
  logits = jnp.where(ok, logits, -1e30)
  return jnp.einsum('bnls,bsnh->blnh', jax.nn.softmax(logits, axis=-1), vf)


def _rel_err(a, b, rows) -> float:
  a = jnp.where(rows[:, :, None, None], a.astype(jnp.float32), 0)
  b = jnp.where(rows[:, :, None, None], b.astype(jnp.float32), 0)
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


def check_attention(smoke: bool) -> dict[str, Any]:
  """Per case: XLA vs a float32 reference, and cuDNN vs XLA (forward and gradients)."""
  dtype = jnp.bfloat16
  out: dict[str, Any] = {}
  for case in attention_cases(smoke):
    q, k, v, g, mask, seg, rows = _case_inputs(case, dtype)
    res: dict[str, Any] = {'shape': {x: case[x] for x in ('B', 'L', 'N', 'K', 'H')}}
    ref = _reference(case, q, k, v, mask, seg)
    xla_out = jax.jit(lambda q, k, v: _attend('xla', case, q, k, v, mask, seg)[0])(q, k, v)
    res['xla_vs_reference_rel_err'] = _rel_err(xla_out, ref, rows)
    ok = res['xla_vs_reference_rel_err'] < ATTN_RTOL
    plan = _attend('cudnn', case, q, k, v, mask, seg)[1] if has_gpu() else None
    if not has_gpu():
      res['cudnn'] = 'skipped: no GPU'
    elif plan.implementation != 'cudnn':
      res['cudnn'] = f'fallback: {plan.fallback}'
    else:
      def loss(impl, q, k, v):
        o = _attend(impl, case, q, k, v, mask, seg)[0]
        return jnp.sum(jnp.where(rows[:, :, None, None], o.astype(jnp.float32) * g, 0)), o
      try:
        (_, o_c), g_c = jax.jit(jax.value_and_grad(lambda *a: loss('cudnn', *a), argnums=(0, 1, 2),
                                                   has_aux=True))(q, k, v)
        (_, o_x), g_x = jax.jit(jax.value_and_grad(lambda *a: loss('xla', *a), argnums=(0, 1, 2),
                                                   has_aux=True))(q, k, v)
        res['cudnn_vs_xla_rel_err'] = {
            'out': _rel_err(o_c, o_x, rows),
            'dq': _rel_err(g_c[0], g_x[0], jnp.ones_like(rows)),
            'dk': _rel_err(g_c[1], g_x[1], jnp.ones_like(rows)),
            'dv': _rel_err(g_c[2], g_x[2], jnp.ones_like(rows))}
        cudnn_ok = max(res['cudnn_vs_xla_rel_err'].values()) < ATTN_RTOL
        res['cudnn'] = 'pass' if cudnn_ok else 'fail'
        ok = ok and cudnn_ok
      except Exception as e:  # noqa: BLE001 - a cuDNN refusal is a finding, not a crash.
        res['cudnn'] = f'fail: {type(e).__name__}: {str(e).splitlines()[0][:300]}'
        ok = False
    res['status'] = 'pass' if ok else 'fail'
    out[case['name']] = res
  return out


# --------------------------------------------------------------------------- precision


def _train_losses(config, steps: int) -> list[float]:
  """Losses of ``steps`` updates of the trainer's own step on fixed synthetic batches."""
  from research import recipe
  from research import sharding as shd
  from research import step as step_lib
  from research.benchmark import synthetic_batch
  from research.train_state import create_train_state
  config, task, _ = recipe.compose(config, build_tokenizer=False)
  mesh = shd.mesh_from_config(config.mesh)
  ts = create_train_state(config, mesh, task)
  batch_sharding = step_lib.batch_sharding(mesh, config)
  step = step_lib.make_train_step(config, task, ts, batch_sharding)
  losses = []
  state = ts.state
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    for i in range(steps):
      c = config.copy_and_resolve_references()
      c.seed = config.seed + i
      state, m = step(state, synthetic_batch(c, batch_sharding))
      losses.append(float(m['loss']))
  return losses


def check_precision(smoke: bool) -> dict[str, Any]:
  """bfloat16 vs float32 compute (float32 parameters both): losses over a few steps."""
  from experiments.pretrain import gpt2, tiny
  steps = 2 if smoke else 10
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    c = tiny.get_config('smoke=True') if smoke else gpt2.get_config('size=124m')
    if not smoke:
      c.batch_size, c.seq_len = 16, 512
      c.model.max_seq_len = 512
      c.data.tokenizer = 'bytes'
      c.model.vocab_size = 0
    c.model.dtype = dtype
    c.model.param_dtype = 'float32'
    c.optimizer.warmup_steps = 1
    runs[dtype] = _train_losses(c, steps)
  f32, b16 = runs['float32'], runs['bfloat16']
  rel = [abs(a - b) / abs(a) for a, b in zip(f32, b16)]
  return {'config': 'tiny.py:smoke=True' if smoke else 'gpt2.py:size=124m (batch 16 x 512, bytes)',
          'steps': steps, 'loss_float32': f32, 'loss_bfloat16': b16,
          'max_rel_diff': max(rel), 'rtol': LOSS_RTOL,
          'loss_decreased': f32[-1] < f32[0] and b16[-1] < b16[0],
          'status': 'pass' if max(rel) < LOSS_RTOL and all(map(math.isfinite, f32 + b16)) else 'fail'}


# --------------------------------------------------------------------------- collectives


def _allreduce_seconds(devices, n_bytes: int, repeats: int) -> tuple[float, bool]:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  n = len(devices)
  mesh = Mesh(np.array(devices), ('x',))
  per = max(n_bytes // 4, 1)
  x = jax.device_put(jnp.arange(n * per, dtype=jnp.float32).reshape(n, per) % 7,
                     NamedSharding(mesh, P('x')))
  f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, 'x'), mesh=mesh, in_specs=P('x'),
                            out_specs=P('x')))
  y = f(x)
  y.block_until_ready()
  expect = np.asarray(x).sum(axis=0)
  correct = bool(np.allclose(np.asarray(y)[0], expect))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times), correct


def check_allreduce(smoke: bool) -> dict[str, Any]:
  """Bus bandwidth of an all-reduce per device pair, and over all devices.

  ``busbw = bytes x 2(n-1)/n / time`` (NCCL-tests' definition: comparable across
  device counts; for a pair it equals bytes / time).
  """
  devs = jax.devices()
  n_bytes = (1 << 20) if smoke else (256 << 20)
  repeats = 2 if smoke else 10
  pool = devs[:4] if smoke else devs
  pairs = {}
  ok = True
  for a, b in itertools.combinations(range(len(pool)), 2):
    t, correct = _allreduce_seconds([pool[a], pool[b]], n_bytes, repeats)
    pairs[f'{a}-{b}'] = {'seconds': t, 'busbw_GBps': n_bytes / t / 1e9, 'correct': correct}
    ok = ok and correct
  result: dict[str, Any] = {'bytes_per_device': n_bytes, 'pairs': pairs}
  if len(devs) > 2:
    t, correct = _allreduce_seconds(devs, n_bytes, repeats)
    n = len(devs)
    result['all_devices'] = {'devices': n, 'seconds': t, 'correct': correct,
                             'busbw_GBps': n_bytes * 2 * (n - 1) / n / t / 1e9}
    ok = ok and correct
  bw = [p['busbw_GBps'] for p in pairs.values()]
  if bw:
    result['pair_busbw_GBps'] = {'min': min(bw), 'median': statistics.median(bw), 'max': max(bw)}
  if not has_gpu():
    result['note'] = 'CPU devices: host memory copies, not NVLink/NCCL'
  result['status'] = 'pass' if ok else 'fail'
  return result


# --------------------------------------------------------------------------- benchmark


def check_benchmark(smoke: bool) -> dict[str, Any]:
  """The 1B config's train step: tokens/s and MFU against 989 TFLOP/s per device.

  Full size on a GPU machine: ``gpt2.py:size=1b`` (batch 256 x 2048); halved until it
  fits when the devices run out of memory (the JSON says which batch ran).
  """
  from experiments.pretrain import gpt2
  from research.benchmark import run_benchmark
  c = gpt2.get_config('size=1b,smoke=True' if smoke else 'size=1b')
  c.data.tokenizer = 'bytes' if smoke else c.data.tokenizer
  tried = []
  import inspect
  extra = ({'measure_roofline': False}
           if 'measure_roofline' in inspect.signature(run_benchmark).parameters else {})
  while True:
    try:
      rep = run_benchmark(c, steps=2 if smoke else 10, warmup=1 if smoke else 3, **extra)
      break
    except Exception as e:  # noqa: BLE001 - out of memory: a smaller batch, said so.
      if 'RESOURCE_EXHAUSTED' not in str(e) or c.batch_size <= jax.device_count():
        return {'status': f'fail: {type(e).__name__}: {str(e).splitlines()[0][:300]}',
                'tried_batch_sizes': tried + [c.batch_size]}
      tried.append(c.batch_size)
      c.batch_size //= 2
  achieved = rep['model_tflops_per_sec'] * 1e12
  n = rep['device_count']
  return {'config': 'gpt2.py:size=1b' + (',smoke=True' if smoke else ''),
          'batch_size': rep['batch_size'], 'seq_len': rep['seq_len'],
          'out_of_memory_at_batch': tried, 'devices': n, 'device_kind': rep['device_kind'],
          'step_time_s': rep['step_time_s'], 'tokens_per_sec': rep['tokens_per_sec'],
          'tokens_per_sec_per_device': rep['tokens_per_sec'] / n,
          'model_tflops_per_sec': rep['model_tflops_per_sec'],
          'mfu_vs_989_tflops': achieved / (H100_PEAK_BF16 * n),
          'compile_s': rep['compile_s'], 'peak_bytes_in_use': rep['peak_bytes_in_use'],
          'final_loss': rep['final_loss'],
          'status': 'pass' if math.isfinite(rep['final_loss']) else 'fail'}


# --------------------------------------------------------------------------- all


CHECKS: dict[str, Callable[[bool], dict[str, Any]]] = {
    'attention': check_attention, 'precision': check_precision,
    'allreduce': check_allreduce, 'benchmark': check_benchmark}


def run_all(*, smoke: bool = False, skip: tuple[str, ...] = (),
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Every check (a crash in one is recorded as its failure; the others still run)."""
  t0 = time.perf_counter()
  report: dict[str, Any] = {'machine': machine(), 'smoke': smoke, 'gpu': has_gpu()}
  for name, fn in CHECKS.items():
    if name in skip:
      report[name] = {'status': 'skipped: --skip'}
      continue
    log(f'gpu_check: {name} ...')
    t = time.perf_counter()
    try:
      report[name] = fn(smoke)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON.
      report[name] = {'status': f'fail: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'}
    report[name]['wall_s'] = time.perf_counter() - t
  report['ok'] = all(_passed(report[n]) for n in CHECKS)
  report['wall_s'] = time.perf_counter() - t0
  return report


def _passed(section: dict[str, Any]) -> bool:
  status = section.get('status')
  if status is None:  # attention: one entry per case.
    return all(_passed(v) for v in section.values() if isinstance(v, dict))
  return not str(status).startswith('fail')


def summary(report: dict[str, Any]) -> str:
  m = report['machine']
  lines = [f"gpu_check on {m['device_count']} x {m['device_kind']} (jax {m['jax_version']}): "
           f"{'OK' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f}s"]
  att = report.get('attention', {})
  for name, r in att.items():
    if isinstance(r, dict) and 'xla_vs_reference_rel_err' in r:
      lines.append(f"  attention {name:22s} xla vs f32 ref {r['xla_vs_reference_rel_err']:.1e}; "
                   f"cudnn: {r['cudnn'] if isinstance(r['cudnn'], str) else r['cudnn']}")
  p = report.get('precision', {})
  if 'max_rel_diff' in p:
    lines.append(f"  precision bf16 vs f32 loss over {p['steps']} steps: max rel diff "
                 f"{p['max_rel_diff']:.1e} ({p['status']})")
  a = report.get('allreduce', {})
  if 'pair_busbw_GBps' in a:
    bw = a['pair_busbw_GBps']
    lines.append(f"  all-reduce {a['bytes_per_device'] >> 20} MiB per device pair: busbw "
                 f"{bw['min']:.2f}..{bw['max']:.2f} GB/s (median {bw['median']:.2f})")
  b = report.get('benchmark', {})
  if 'tokens_per_sec' in b:
    lines.append(f"  benchmark {b['config']}: {b['tokens_per_sec']:,.0f} tokens/s, MFU vs "
                 f"989 TFLOP/s {100 * b['mfu_vs_989_tflops']:.2f}%")
  for name in CHECKS:
    st = report.get(name, {}).get('status')
    if st and str(st).startswith('fail'):
      lines.append(f'  {name}: {st}')
  return '\n'.join(lines)
