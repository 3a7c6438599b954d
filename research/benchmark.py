"""Times the jitted train step: compile time, step time, tokens/s, TFLOP/s, MFU, memory.

Synthetic token batches (uniform random ids) isolate the step from the input
pipeline. The step is timed as the median of ``steps`` calls after ``warmup`` calls,
each ended by ``block_until_ready``. MFU uses the same FLOP model as training
(PaLM appendix B); on CPU the peak is a matmul roofline measured in this process,
right after the timed steps (``roofline`` in the report says how). The side-by-side
comparison with a PyTorch reference is ``benchmarks/side_by_side.py``.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import backend_defaults
from research import metrics as metrics_lib
from research import recipe
from research import sharding as shd
from research import step as step_lib
from research.models.transformer import count_params, padded_vocab_size, resolved_dims
from research.train_state import create_train_state
from research.validation import check_batch_divisibility, check_tensor_divisibility


def synthetic_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, jax.Array]:
  key = jax.random.key(config.seed)
  shape = (config.batch_size, config.seq_len)
  tokens = jax.random.randint(key, (shape[0], shape[1] + 1), 3, config.model.vocab_size,
                              dtype=jnp.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'mask': jnp.ones(shape, jnp.float32)}
  return jax.device_put(batch, sharding)


def _cpu_seconds() -> float:
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 10,
                  warmup: int = 2, started_unix: float | None = None,
                  measure_roofline: bool = True, profile_dir: str = '',
                  profile_steps: int = 3) -> dict[str, Any]:
  """Times ``config``'s train step (the one ``launch.train`` runs) and reports MFU.

  ``started_unix``: when this process started (``launch.benchmark`` and the
  side-by-side harness pass it); the time to first step counts from it, so it includes
  imports, state creation and compilation. ``first_step_done_unix`` lets a parent
  process measure from its own clock. CPU seconds per step come from
  ``getrusage(RUSAGE_SELF)`` over the timed steps (all threads of this process).
  The MFU's peak is measured here, after the timed steps (see
  :func:`research.metrics.measure_cpu_roofline`); accelerators use the datasheet.
  ``profile_dir``: after the timed steps, ``profile_steps`` more run under
  ``jax.profiler.trace`` (with a Perfetto trace; benchmarks/profile_step.py reads it).
  """
  entered = time.time()
  started_unix = entered if started_unix is None else started_unix
  # The run's composed task (its sources read, not trained) and the trainer's own step,
  # with the execution choices recipe.run makes on this backend.
  config = ml_collections.ConfigDict(config.to_dict())
  backend_changes = backend_defaults.apply(config)
  config, task, _ = recipe.compose(config, build_tokenizer=False)
  mesh = shd.mesh_from_config(config.mesh)
  check_batch_divisibility(config, dict(mesh.shape), jax.process_count())
  check_tensor_divisibility(config.model, mesh.shape['tensor'])

  t0 = time.perf_counter()
  ts = create_train_state(config, mesh, task)
  init_s = time.perf_counter() - t0
  model_view, _ = nnx.merge(ts.graphdef, ts.state)
  params = count_params(model_view)
  del model_view
  batch_sharding = step_lib.batch_sharding(mesh, config)
  step = step_lib.make_train_step(config, task, ts, batch_sharding)
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    batch = synthetic_batch(config, batch_sharding)
    t0 = time.perf_counter()
    compiled = step.lower(ts.state, batch).compile()
    compile_s = time.perf_counter() - t0
    state = ts.state
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    first_step_s = time.perf_counter() - t0
    first_step_done_unix = time.time()
    for _ in range(max(warmup - 1, 0)):
      state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    cpu0 = _cpu_seconds()
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t)
    cpu_per_step = (_cpu_seconds() - cpu0) / max(steps, 1)
    if profile_dir:
      with open(os.path.join(profile_dir, 'train_step.hlo.txt'), 'w') as f:
        f.write(compiled.as_text())  # Names the fused ops the trace shows.
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(profile_steps):
          state, m = compiled(state, batch)
        jax.block_until_ready((state, m))

  step_s = statistics.median(times)
  dims = resolved_dims(config.model)
  flops_per_token = metrics_lib.model_flops_per_token(
      params['non_embedding'], config.model.num_layers,
      config.model.num_heads * dims['head_dim'], config.seq_len)
  tokens = config.batch_size * config.seq_len
  achieved = tokens * flops_per_token / step_s
  dev = jax.devices()[0]
  roofline = None
  known = metrics_lib.datasheet_peak_flops()
  if known is not None:
    peak_total, peak_source = known[0] * jax.device_count(), known[1]
  elif dev.platform == 'cpu' and measure_roofline:
    # One host: XLA's CPU devices share its cores, so the roofline is not per device.
    roofline = metrics_lib.measure_cpu_roofline()
    peak_total, peak_source = roofline['flops'], 'measured:cpu_matmul_in_process'
  else:
    peak_total, peak_source = float('nan'), 'unknown'
  mem = compiled.memory_analysis()
  memory = {}
  if mem is not None:
    for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
              'generated_code_size_in_bytes', 'alias_size_in_bytes'):
      memory[k] = int(getattr(mem, k, 0) or 0)
  stats = dev.memory_stats() or {}
  model_summary = model_config_summary(config)
  return {
      'config_name': config.name, 'device_kind': dev.device_kind, 'platform': dev.platform,
      'device_count': jax.device_count(), 'mesh_shape': dict(mesh.shape),
      'jax_version': jax.__version__,
      'cpus_allowed': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                      else os.cpu_count(),
      'batch_size': config.batch_size, 'seq_len': config.seq_len,
      'dtype': config.model.dtype, 'remat': config.model.remat, 'model': model_summary,
      'backend_defaults': backend_changes,
      'compilation_cache_dir': jax.config.jax_compilation_cache_dir or None,
      'param_count': params['total'], 'param_count_non_embedding': params['non_embedding'],
      'init_s': init_s, 'compile_s': compile_s, 'first_step_s': first_step_s,
      'time_to_first_step_s': first_step_done_unix - started_unix,
      'started_unix': started_unix, 'first_step_done_unix': first_step_done_unix,
      'step_time_s': step_s, 'step_time_min_s': min(times), 'step_time_max_s': max(times),
      'step_times_s': times, 'cpu_s_per_step': cpu_per_step,
      'tokens_per_sec': tokens / step_s,
      'model_flops_per_token': flops_per_token,
      'model_tflops_per_sec': achieved / 1e12,
      'peak_flops_total': peak_total, 'peak_flops_source': peak_source,
      'roofline': roofline,
      'mfu': achieved / peak_total,
      'memory_analysis': memory,
      'peak_bytes_in_use': int(stats.get('peak_bytes_in_use', 0)),
      'final_loss': float(m['loss']),
  }


def model_config_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved model and optimizer settings a reference implementation must match."""
  mc, o = config.model, config.optimizer
  dims = resolved_dims(mc)
  return {
      'num_layers': mc.num_layers, 'num_heads': mc.num_heads, 'd_model': mc.d_model,
      'head_dim': dims['head_dim'], 'num_kv_heads': dims['num_kv_heads'],
      'mlp_dim': dims['mlp_dim'], 'mlp_kind': mc.mlp_kind, 'norm': mc.norm,
      'norm_eps': mc.norm_eps, 'positions': mc.positions,
      'tie_embeddings': mc.tie_embeddings, 'use_bias': mc.use_bias,
      'dropout': mc.dropout, 'max_seq_len': mc.max_seq_len, 'vocab_size': mc.vocab_size,
      'padded_vocab_size': padded_vocab_size(mc.vocab_size), 'init_std': mc.init_std,
      'dtype': mc.dtype, 'scan_layers': mc.scan_layers, 'projection_vjp': mc.projection_vjp,
      'optimizer': {'name': o.name, 'learning_rate': o.learning_rate, 'b1': o.b1, 'b2': o.b2,
                    'eps': o.eps, 'weight_decay': o.weight_decay, 'clip_norm': o.clip_norm,
                    'grad_accum_steps': o.grad_accum_steps},
  }
