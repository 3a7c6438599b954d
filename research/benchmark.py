"""Times the jitted train step: compile time, step time, tokens/s, TFLOP/s, MFU, memory.

Synthetic token batches (uniform random ids) isolate the step from the input
pipeline. The step is timed as the median of ``steps`` calls after ``warmup`` calls,
each ended by ``block_until_ready``. MFU uses the same FLOP model as training
(PaLM appendix B); on CPU the peak is the measured matmul roofline.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import metrics as metrics_lib
from research import recipe
from research import sharding as shd
from research import step as step_lib
from research.models.transformer import count_params, resolved_dims
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


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 10,
                  warmup: int = 2) -> dict[str, Any]:
  # The run's composed task (its sources read, not trained) and the trainer's own step.
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
    for _ in range(warmup):
      state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t)

  step_s = statistics.median(times)
  dims = resolved_dims(config.model)
  flops_per_token = metrics_lib.model_flops_per_token(
      params['non_embedding'], config.model.num_layers,
      config.model.num_heads * dims['head_dim'], config.seq_len)
  tokens = config.batch_size * config.seq_len
  achieved = tokens * flops_per_token / step_s
  peak, peak_source = metrics_lib.device_peak_flops()
  peak_total = peak * jax.device_count()
  mem = compiled.memory_analysis()
  memory = {}
  if mem is not None:
    for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
              'generated_code_size_in_bytes', 'alias_size_in_bytes'):
      memory[k] = int(getattr(mem, k, 0) or 0)
  stats = jax.devices()[0].memory_stats() or {}
  dev = jax.devices()[0]
  return {
      'config_name': config.name, 'device_kind': dev.device_kind, 'platform': dev.platform,
      'device_count': jax.device_count(), 'mesh_shape': dict(mesh.shape),
      'batch_size': config.batch_size, 'seq_len': config.seq_len,
      'dtype': config.model.dtype, 'remat': config.model.remat,
      'param_count': params['total'], 'param_count_non_embedding': params['non_embedding'],
      'init_s': init_s, 'compile_s': compile_s,
      'step_time_s': step_s, 'step_time_min_s': min(times), 'step_time_max_s': max(times),
      'tokens_per_sec': tokens / step_s,
      'model_flops_per_token': flops_per_token,
      'model_tflops_per_sec': achieved / 1e12,
      'peak_flops_total': peak_total, 'peak_flops_source': peak_source,
      'mfu': achieved / peak_total,
      'memory_analysis': memory,
      'peak_bytes_in_use': int(stats.get('peak_bytes_in_use', 0)),
      'final_loss': float(m['loss']),
  }
