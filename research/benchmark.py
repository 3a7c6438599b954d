"""Times the jitted train step: compile time, step time, tokens/s, TFLOP/s, MFU, memory.

Synthetic token batches (uniform random ids) isolate the step from the input
pipeline. The step is timed as the median of ``steps`` calls after ``warmup`` calls,
each ended by ``block_until_ready``. MFU uses the same FLOP model as training
(PaLM appendix B); on CPU the peak is the measured matmul roofline.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import metrics as metrics_lib
from research import sharding as shd
from research.models.transformer import count_params, resolved_dims
from research.tasks import make_task
from research.train import create_train_state, train_step
from research.validation import (check_batch_divisibility, check_tensor_divisibility,
                                 validate_config)


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
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = 259  # The byte tokenizer's vocabulary.
  validate_config(config)
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  check_batch_divisibility(config, dict(mesh.shape), jax.process_count())
  check_tensor_divisibility(config.model, mesh.shape['tensor'])

  task = make_task(config)
  t0 = time.perf_counter()
  ts = create_train_state(config, mesh, task.build_model, wrt=task.trainable)
  init_s = time.perf_counter() - t0
  model_view, _ = nnx.merge(ts.graphdef, ts.state)
  params = count_params(model_view)
  del model_view
  batch_sharding = shd.named(mesh, ('batch', 'seq'))
  step = jax.jit(
      functools.partial(train_step, ts.graphdef, objective=task.objective,
                        accum_steps=config.optimizer.grad_accum_steps, wrt=task.trainable),
      in_shardings=(ts.shardings, batch_sharding), out_shardings=(ts.shardings, None),
      donate_argnums=(0,))
  with shd.use_mesh(mesh):
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
