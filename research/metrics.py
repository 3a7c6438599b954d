"""Metric writers (JSONL + TensorBoard), throughput, MFU and the progress line.

Only process 0 writes. ``metrics.jsonl`` is append-only; on resume, rows past the
restored step (written after the last checkpoint, before a crash) are dropped so no
step appears twice.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched by substring of
# ``device.device_kind`` (lower case). Order matters: longer names first.
PEAK_FLOPS = (
    ('h200', 989e12),
    ('h100', 989e12),
    ('a100', 312e12),
    ('l4', 121e12),
    ('tpu v6', 918e12),
    ('tpu v5p', 459e12),
    ('tpu v5 lite', 197e12),
    ('tpu v5e', 197e12),
    ('tpu v5', 459e12),  # v5p reports 'TPU v5' (after the v5e names: substring match).
    ('tpu v4', 275e12),
)


def model_flops_per_token(n_params_non_embedding: int, num_layers: int,
                          d_attn: int, seq_len: int) -> float:
  """Training FLOPs per token (PaLM, appendix B): 6N + 12·L·d·T."""
  return 6.0 * n_params_non_embedding + 12.0 * num_layers * d_attn * seq_len


def _cpu_cache_path() -> str:
  root = os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache'))
  return os.path.join(root, 'research', f'cpu_peak_{platform.node()}_{os.cpu_count()}.json')


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a jitted n×n matmul on the default device (best of ``repeats``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


CPU_ROOFLINE_SIZES = (1024, 2048, 3072)


def measure_cpu_roofline(sizes: tuple[int, ...] = CPU_ROOFLINE_SIZES,
                         repeats: int = 5) -> dict[str, Any]:
  """The CPU's matmul roofline, measured now, in this process.

  A CPU has no datasheet figure JAX can look up, and what it reaches depends on the
  cores this process may use, their clocks and the load of the moment; so a
  benchmark measures it beside the step it reports MFU for (same process, same
  affinity, same threads, same minute) instead of reusing a figure cached under other
  conditions. Method: float32 n×n jitted matmuls for each n in ``sizes`` (large enough
  to reach the GEMM kernel's peak), best of ``repeats`` each, the best size's FLOP/s.
  On CPU the figure is the whole host's (XLA's CPU devices share one thread pool).
  """
  t0 = time.perf_counter()
  per_size = {int(n): measure_matmul_flops(n, jnp.float32, repeats) for n in sizes}
  return {'flops': max(per_size.values()),
          'method': (f'best of {repeats} jitted float32 n x n matmuls (2n^3 FLOPs) for n in '
                     f'{list(per_size)}, measured in the benchmark process'),
          'per_size_flops': per_size, 'measure_s': time.perf_counter() - t0,
          'cpus_allowed': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                          else os.cpu_count()}


def datasheet_peak_flops() -> tuple[float, str] | None:
  """Dense bf16 peak of one accelerator from :data:`PEAK_FLOPS`, or None (CPU, unknown)."""
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops, f'datasheet:{name}'
  return None


def device_peak_flops() -> tuple[float, str]:
  """Peak FLOP/s of one device and where the number comes from (training's MFU).

  Accelerators: the datasheet table. CPU: a matmul roofline measured once per
  machine and cached, so training does not pay for it at every start. ``launch.benchmark``
  does not use this cache: it measures the roofline in its own process
  (:func:`measure_cpu_roofline`).
  """
  known = datasheet_peak_flops()
  if known is not None:
    return known
  if jax.devices()[0].platform == 'cpu':
    path = _cpu_cache_path()
    try:
      with open(path) as f:
        return float(json.load(f)['flops']), 'measured:cpu_matmul'
    except (OSError, ValueError, KeyError):
      pass
    flops = measure_matmul_flops()
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'w') as f:
        json.dump({'flops': flops, 'n': 2048, 'dtype': 'float32'}, f)
    except OSError:
      pass
    return flops, 'measured:cpu_matmul'
  return float('nan'), 'unknown'


class MetricsWriter:
  """Writes rows to ``metrics.jsonl`` and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True,
               config=None):
    """``config`` with ``wandb.project`` set adds the Weights & Biases sink."""
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._wandb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # Imported late: heavy.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if config is not None and config.wandb.project:
      from research.wandb_writer import WandbSink  # Optional dependency.
      self._wandb = WandbSink(config, workdir)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        continue  # A line cut by a crash mid-write.
    if len(kept) != len(rows):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
           for k, v in row.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    split = row.get('split', 'train')
    for k, v in row.items():
      if k not in ('step', 'split') and isinstance(v, (int, float)):
        self._tb.add_scalar(f'{split}/{k}', v, row['step'])
    if self._wandb is not None:
      self._wandb.write(row)

  def write_hparams(self, config, final_metrics: dict[str, Any]) -> None:
    """The run's config as TensorBoard hparams (the HPARAMS tab compares runs by them):
    every scalar key, dotted, with the final metrics."""
    if not self.enabled:
      return
    hparams = {}
    flat = [('', config.to_dict())]
    while flat:
      prefix, node = flat.pop()
      for k, v in node.items():
        if isinstance(v, dict):
          flat.append((f'{prefix}{k}.', v))
        elif isinstance(v, (bool, int, float, str)):
          hparams[f'{prefix}{k}'] = v
    metrics = {f'hparams/{k}': float(v) for k, v in final_metrics.items()
               if isinstance(v, (int, float))}
    self._tb.add_hparams(hparams, metrics, name='hparams', global_step=config.steps)
    if self._wandb is not None:
      self._wandb.summarize(final_metrics)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
