"""The environment a GPU run needs: XLA flags, NCCL settings and the memory fraction.

JAX reads these when its GPU backend starts, so they must be in the process's
environment before ``import jax`` runs a computation: the launchers
(``launch.local --gpus_per_process``, ``launch.slurm --gpus_per_node``,
``launch.k8s --gpus_per_process``) put them into every process they start. Values
the user already set win (an explicit ``XLA_FLAGS`` flag, ``--env=NAME=VALUE``).

XLA flags (every one is parsed by this jaxlib; ``tests/test_gpu_check.py`` checks that
an unknown flag would be caught, since XLA aborts on one):

* ``--xla_gpu_enable_latency_hiding_scheduler=true``: schedule the FSDP all-gathers /
  reduce-scatters and data-parallel all-reduces to overlap with compute (the JAX GPU
  performance guide's first recommendation);
* ``--xla_gpu_enable_pipelined_{all_gather,reduce_scatter,all_reduce}=true`` and
  ``--xla_gpu_enable_while_loop_double_buffering=true``: let a scanned layer stack
  prefetch the next layer's weights during the current layer;
* combine thresholds (all-reduce/all-gather 128 MiB, reduce-scatter 64 MiB): fewer,
  larger NCCL calls for the many small per-parameter collectives;
* ``--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL``: CUDA graphs for
  fusions, cuBLAS and custom calls (cuDNN attention), which removes launch overhead
  of small kernels, without collectives inside graphs (those deadlock-prone cases
  are why MaxText disables command buffers outright).

Environment: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX preallocates 75% of GPU memory by
default; :data:`DEFAULT_MEMORY_FRACTION` = 0.90 leaves 10% to cuDNN/cuBLAS
workspaces and NCCL buffers, which XLA does not count); ``NCCL_DEBUG=WARN`` (a failing
collective names its cause in the log); ``NCCL_NVLS_ENABLE=0`` is *not* set: NVLink
SHARP helps all-reduce on H100/H200 NVSwitch systems.

The planner's "fits" on a GPU uses :func:`memory_fraction`: a plan fits when the
compiled peak is at most ``device memory x fraction``.
"""

from __future__ import annotations

import os
from typing import Mapping

DEFAULT_MEMORY_FRACTION = 0.90
JAX_DEFAULT_MEMORY_FRACTION = 0.75  # What JAX preallocates when nothing is set.

XLA_GPU_FLAGS: tuple[str, ...] = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
    '--xla_gpu_all_reduce_combine_threshold_bytes=134217728',
    '--xla_gpu_all_gather_combine_threshold_bytes=134217728',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864',
    '--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL',
)

NCCL_ENV: dict[str, str] = {
    'NCCL_DEBUG': 'WARN',
}


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def merge_xla_flags(user: str, ours: tuple[str, ...] = XLA_GPU_FLAGS) -> str:
  """``ours`` followed by ``user``'s flags; a flag the user sets keeps the user's value."""
  user_flags = user.split()
  named = {_flag_name(f) for f in user_flags}
  kept = [f for f in ours if _flag_name(f) not in named]
  return ' '.join(kept + user_flags)


def gpu_env(base: Mapping[str, str] | None = None, *,
            memory_fraction: float | None = None) -> dict[str, str]:
  """The variables to add to ``base`` (default: this process's env) for a GPU run.

  Returns only what to set: ``XLA_FLAGS`` merged with base's, the memory fraction and
  the NCCL settings, each unless ``base`` already sets it.
  """
  base = dict(os.environ if base is None else base)
  out = {'XLA_FLAGS': merge_xla_flags(base.get('XLA_FLAGS', ''))}
  if 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in base:
    fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f'GPU memory fraction {fraction} must be in (0, 1].')
    out['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{fraction:.2f}'
  for k, v in NCCL_ENV.items():
    if k not in base:
      out[k] = v
  return out


def memory_fraction(env: Mapping[str, str] | None = None) -> float:
  """The share of GPU memory a run can use, as JAX will preallocate it.

  ``XLA_PYTHON_CLIENT_MEM_FRACTION`` if set; else the launchers' default
  (:data:`DEFAULT_MEMORY_FRACTION`, what :func:`gpu_env` sets). With
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` JAX grows on demand up to the whole device (1.0,
  at the price of fragmentation).
  """
  env = os.environ if env is None else env
  if 'XLA_PYTHON_CLIENT_MEM_FRACTION' in env:
    return float(env['XLA_PYTHON_CLIENT_MEM_FRACTION'])
  if env.get('XLA_PYTHON_CLIENT_PREALLOCATE', '').lower() in ('false', '0'):
    return 1.0
  return DEFAULT_MEMORY_FRACTION


def apply(env: dict[str, str] | None = None) -> dict[str, str]:
  """Sets :func:`gpu_env` in ``env`` (default ``os.environ``, before JAX starts); returns it."""
  target = os.environ if env is None else env
  added = gpu_env(target)
  target.update(added)
  return added
