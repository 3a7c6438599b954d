"""Search over mesh shapes, remat policies and micro-batch counts: what fits, ranked.

``launch.plan --search --topology=v5p-256`` enumerates every ``data x fsdp x tensor``
factorisation of the chip count (tensor in ``--search_tensor``, batch divisible by the
data shards), every ``model.remat`` policy and every ``optimizer.grad_accum_steps`` in
``--search_accum``; then

1. screens each candidate analytically, without compiling: the state and the
   activation estimate of :func:`research.plan.analytic_memory` against the chip's
   HBM (with a 15% margin: the estimate is within ~10% of the compiler, README
   "Scaling"), and orders the survivors by an analytic step time (FLOPs with the
   policy's recomputation at the chip's peak, plus the bytes FSDP/data/tensor
   parallelism move over ICI);
2. compiles the best ``--max_compiles`` of them with the real compiler (TPU via
   libtpu, or the CPU devices), which refuses what does not fit (the TPU compiler's
   own "Ran out of memory in HBM" check);
3. ranks what fits by the compiler's time estimate: ``cost_analysis()['optimal_seconds']``
   scaled by the loop trip counts the compiler leaves out (a scanned layer stack is
   counted once), overlapped with the collectives' ICI time, as the step time; the
   table shows tokens/s per chip and the MFU it implies.

MaxText's AOT ``train_compile`` answers "does this one config fit"; this answers
"which of the configs that fit is fastest", with the same compiler.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ml_collections

from research import plan as plan_lib
from research.config import override
from research.models.transformer import REMAT_POLICIES, resolved_dims

# Matmul recomputation per policy (forward passes per step / 3 of 6N): full remat runs
# the forward twice (8N instead of 6N); the dots policies recompute only elementwise
# work and the attention core.
REMAT_FLOPS_FACTOR = {'none': 1.0, 'dots_saveable': 1.0,
                      'dots_with_no_batch_dims_saveable': 1.03, 'full': 4.0 / 3.0}
SCREEN_MARGIN = 1.15


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(config: ml_collections.ConfigDict, n_devices: int, *,
               tensors: Sequence[int] = (1, 2, 4, 8),
               remats: Sequence[str] | None = None,
               accums: Sequence[int] = (1, 2, 4)) -> list[dict[str, Any]]:
  """Override dicts for every admissible (mesh, remat, micro-batches) combination."""
  m = config.model
  dims = resolved_dims(m)
  remats = list(remats or REMAT_POLICIES)
  stage = max(int(config.mesh.get('stage', 1)), 1)  # Pipeline stages: kept as given.
  out = []
  for t in tensors:
    if n_devices % (t * stage) or m.num_heads % t or (dims['num_kv_heads'] % t and t % dims['num_kv_heads']):
      continue
    if dims['mlp_dim'] % t:
      continue
    rest = n_devices // (t * stage)
    for data in _divisors(rest):
      fsdp = rest // data
      if m.d_model % fsdp:
        continue
      for k in accums:
        if config.batch_size % (k * data * fsdp):
          continue
        for remat in remats:
          out.append({'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': t,
                      'mesh.sequence': 1, 'mesh.stage': stage, 'model.remat': remat,
                      'optimizer.grad_accum_steps': k})
  return out


def analytic_step_seconds(config: ml_collections.ConfigDict, n_devices: int,
                          peak_flops: float, link_bw: float) -> dict[str, float]:
  """A compile-free step time: compute at peak, plus what the mesh moves over ICI.

  Per device and step, with P parameters (weights gathered in the compute dtype,
  gradients reduced in float32): FSDP all-gathers the weights for the forward and
  the backward pass of every micro-batch and reduce-scatters the gradients; data
  parallelism all-reduces the FSDP-sharded gradients (2x for a ring); tensor
  parallelism all-reduces one [tokens, d_model] activation twice per layer forward
  and twice backward. Used only to order candidates before compiling.
  """
  m = config.model
  mesh = config.mesh
  data, fsdp, t = mesh.data, mesh.fsdp, mesh.tensor
  k = config.optimizer.grad_accum_steps
  n_params = plan_lib.param_count_estimate(m)
  a = 2 if m.dtype == 'bfloat16' else 4
  tokens = config.batch_size * config.seq_len
  model_flops = plan_lib.model_flops_per_step(config)
  compute = model_flops * REMAT_FLOPS_FACTOR.get(m.remat, 1.0) / (n_devices * peak_flops)
  p_dev = n_params / t
  comm = 0.0
  if fsdp > 1:
    comm += k * (2 * p_dev * a + p_dev * 4) * (fsdp - 1) / fsdp
  if data > 1:
    comm += 2 * (p_dev / fsdp) * 4 * (data - 1) / data
  if t > 1:
    comm += 4 * m.num_layers * 2 * (tokens / (data * fsdp)) * m.d_model * a * (t - 1) / t
  comm_s = comm / link_bw
  return {'compute_s': compute, 'collective_s': comm_s, 'step_s': max(compute, comm_s)}


def search(config: ml_collections.ConfigDict, *, topology=None,
           device_memory_gb: float | None = None, memory_fraction: float | None = None,
           remats: Sequence[str] | None = None, accums: Sequence[int] = (1, 2, 4),
           tensors: Sequence[int] = (1, 2, 4, 8), max_compiles: int = 12,
           workers: int = 1,
           log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Screens, compiles and ranks; returns ``{'ranked': [...], 'rejected': [...], ...}``."""
  import jax
  t_start = time.perf_counter()
  devices = None
  if topology is not None:
    from research import topology as topology_lib
    devices = topology_lib.devices(topology)
    chip = topology.chip
    capacity = chip.hbm_bytes
    peak, link = chip.peak_bf16_flops, chip.ici_bw
    target = topology.describe()
  else:
    devices = jax.devices()
    capacity = (device_memory_gb or 80.0) * plan_lib.GiB * (
        plan_lib.resolve_memory_fraction(memory_fraction))
    peak, link = 989e12, 450e9  # H100/H200 bf16 dense; NVLink 4 per direction.
    target = f'{len(devices)} CPU devices standing in for GPUs'
  n = len(devices)
  base = ml_collections.ConfigDict(config.to_dict())
  plan_lib.resolve_vocab(base)
  cands = candidates(base, n, tensors=tensors, remats=remats, accums=accums)
  screened, rejected = [], []
  for ov in cands:
    c = ml_collections.ConfigDict(base.to_dict())
    override(c, ov)
    mem = plan_lib.analytic_memory(c, dict(data=ov['mesh.data'], fsdp=ov['mesh.fsdp'],
                                           tensor=ov['mesh.tensor'], sequence=1,
                                           stage=ov['mesh.stage']))
    est = analytic_step_seconds(c, n, peak, link)
    row = {'overrides': ov, 'analytic_bytes': mem['total'], 'analytic_step_s': est['step_s'],
           'analytic_collective_s': est['collective_s']}
    if mem['total'] > capacity * SCREEN_MARGIN:
      row['why'] = (f'analytic {mem["total"] / plan_lib.GiB:.1f} GiB > '
                    f'{capacity / plan_lib.GiB:.1f} GiB x {SCREEN_MARGIN}')
      rejected.append(row)
    else:
      screened.append(row)
  screened.sort(key=lambda r: (r['analytic_step_s'], r['analytic_collective_s']))
  # The config as given is always compiled (the baseline the ranking is against).
  given = {'mesh.data': base.mesh.data, 'mesh.fsdp': base.mesh.fsdp,
           'mesh.tensor': base.mesh.tensor, 'model.remat': base.model.remat,
           'optimizer.grad_accum_steps': base.optimizer.grad_accum_steps}
  if given['mesh.fsdp'] == -1 and given['mesh.data'] > 0 and given['mesh.tensor'] > 0:
    given['mesh.fsdp'] = n // (given['mesh.data'] * given['mesh.tensor']
                               * max(base.mesh.get('stage', 1), 1))
  baseline = [r for r in screened if all(r['overrides'][k] == v for k, v in given.items())]
  if baseline and max_compiles > 0 and baseline[0] not in screened[:max_compiles]:
    screened.remove(baseline[0])
    screened.insert(max_compiles - 1, baseline[0])
  for r in baseline[:1]:
    r['baseline'] = True
  log(f'search: {len(cands)} candidates on {target}; {len(screened)} pass the analytic '
      f'memory screen; compiling the best {min(max_compiles, len(screened))}')
  ranked = []
  chosen = screened[:max_compiles]
  memory_gb = None if topology is not None else (device_memory_gb or 80.0)
  args = [(base.to_dict(), row['overrides'], topology, memory_gb, memory_fraction)
          for row in chosen]
  if workers > 1 and len(chosen) > 1:
    # Compiles are single-threaded for most of their time: one process per candidate.
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      results = list(pool.map(_compile_one, args))
  else:
    results = [_compile_one(a) for a in args]
  for i, (row, (summary, why, seconds)) in enumerate(zip(chosen, results)):
    row['compile_s'] = seconds
    label = describe(row['overrides'])
    if summary is None:
      row['why'] = (f'compiler: {why[:200]}' if 'does not fit' in why else f'error: {why[:200]}')
      rejected.append(row)
      log(f'  [{i + 1}] {label}: {row["why"][:160]} ({seconds:.0f}s)')
      continue
    row['report'] = summary
    ranked.append(row)
    log(f'  [{i + 1}] {label}: peak {summary["peak_bytes"] / plan_lib.GiB:.1f} GiB, '
        f'step {summary["step_s"]:.3f}s ({seconds:.0f}s to compile)')
  ranked.sort(key=lambda r: r['report']['step_s'])
  for row in screened[max_compiles:]:
    row['why'] = 'not compiled (beyond --max_compiles; analytically slower)'
  return {'config_name': base.name, 'target': target, 'devices': n,
          'candidates': len(cands), 'screened': len(screened), 'compiled': min(max_compiles, len(screened)),
          'ranked': ranked, 'rejected': rejected,
          'not_compiled': [r for r in screened[max_compiles:]],
          'wall_s': time.perf_counter() - t_start}


def _compile_one(args) -> tuple[dict[str, Any] | None, str, float]:
  """(summary or None, why it does not fit, seconds) of one candidate; runs in a worker."""
  config_dict, ov, topology, memory_gb, memory_fraction = args
  c = ml_collections.ConfigDict(config_dict)
  override(c, ov)
  t0 = time.perf_counter()
  try:
    rep = plan_lib.plan(c, floor=False, topology=topology, device_memory_gb=memory_gb,
                        memory_fraction=memory_fraction)
  except plan_lib.PlanError as e:
    return None, str(e), time.perf_counter() - t0
  except Exception as e:  # noqa: BLE001 - e.g. a mesh the topology cannot lay out.
    return None, f'{type(e).__name__}: {str(e).splitlines()[0][:200]}', time.perf_counter() - t0
  return _summary(rep), '', time.perf_counter() - t0


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
  te = rep['time_estimate']
  mem = rep['memory_per_device']
  return {'peak_bytes': mem['compiled']['peak_bytes'], 'analytic_bytes': mem['analytic']['total'],
          'step_s': te['step_s'], 'compute_s': te['compute_s'],
          'collective_s': te['collective_s'], 'tokens_per_s_per_device': te['tokens_per_s_per_device'],
          'mfu': te['mfu'], 'compile_s': rep['timing_s'].get('compile_s')}


def describe(ov: dict[str, Any]) -> str:
  return (f"data={ov['mesh.data']} fsdp={ov['mesh.fsdp']} tensor={ov['mesh.tensor']} "
          f"remat={ov['model.remat']} accum={ov['optimizer.grad_accum_steps']}")


def format_table(result: dict[str, Any]) -> str:
  """The ranked table (Markdown, so README can show it as printed)."""
  g = plan_lib.GiB
  lines = [f"search: {result['config_name']} on {result['target']}: {result['candidates']} "
           f"candidates, {result['screened']} pass the analytic screen, "
           f"{result['compiled']} compiled, {len(result['ranked'])} fit "
           f"({result['wall_s']:.0f}s)", '',
           '| rank | data | fsdp | tensor | remat | accum | peak GiB | analytic GiB | '
           'compute s | collective s | step s | tokens/s/chip | MFU |',
           '|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for i, row in enumerate(result['ranked']):
    ov, r = row['overrides'], row['report']
    lines.append(
        f"| {i + 1} | {ov['mesh.data']} | {ov['mesh.fsdp']} | {ov['mesh.tensor']} | "
        f"{ov['model.remat']} | {ov['optimizer.grad_accum_steps']} | {r['peak_bytes'] / g:.1f} | "
        f"{r['analytic_bytes'] / g:.1f} | {r['compute_s']:.3f} | {r['collective_s']:.3f} | "
        f"{r['step_s']:.3f} | {r['tokens_per_s_per_device']:,.0f} | {100 * r['mfu']:.1f}% |")
  compiled_out = [r for r in result['rejected'] if r.get('why', '').startswith(('compiler', 'error'))]
  if compiled_out:
    lines.append('')
    lines.append('compiled but refused (compiler out of memory, or an error):')
    for row in compiled_out:
      lines.append(f"  {describe(row['overrides'])}: {row['why'][:160]}")
  screened_out = [r for r in result['rejected']
                  if not r.get('why', '').startswith(('compiler', 'error'))]
  if screened_out:
    lines.append(f'{len(screened_out)} rejected by the analytic screen without compiling, e.g. '
                 + '; '.join(f"{describe(r['overrides'])} ({r['why']})" for r in screened_out[:2]))
  if result['not_compiled']:
    lines.append(f"{len(result['not_compiled'])} fit analytically but were not compiled "
                 f"(--max_compiles={result['compiled']}): the fastest of them analytically is "
                 f"{describe(result['not_compiled'][0]['overrides'])}.")
  return '\n'.join(lines)
