"""The trainer shared by pretraining and fine-tuning.

Flow (each step is a function below):
  validate config -> mesh -> tokenizer + data -> sharded state (created sharded under
  jit) -> restore the latest checkpoint if the workdir has one -> loop -> final eval,
  samples, summary.

The train step is a pure jitted function of (state, batch) with explicit shardings and
the state donated. The host never waits on a step before dispatching the next: the
metrics of step s are fetched after step s+1 has been dispatched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from research import batch_ramp as ramp_lib
from research import checkpoint as ckpt_lib
from research import metrics as metrics_lib
from research import preemption
from research import sharding as shd
from research.config import ConfigError, validate_quant_config
from research.runtime import UserError
from research.data import sources, tokenizers
from research.models.transformer import count_params, resolved_dims
from research.tasks import Task, make_task
from research.optim import make_optimizer, path_str
from research.validation import (check_batch_divisibility, check_tensor_divisibility,
                                 validate_config)


# --------------------------------------------------------------------------- state


class NonFiniteError(UserError, FloatingPointError):
  """The loss or a gradient was NaN/inf under nan_policy='stop'."""



@dataclasses.dataclass
class TrainState:
  """What the loop carries: the NNX graph definition and the (sharded) state."""
  graphdef: Any
  state: Any  # nnx.State of (model, optimizer)
  shardings: Any
  schedule: optax.Schedule


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> None:
  """Fills model.vocab_size=0 from the tokenizer; refuses a vocab the model can't hold."""
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer_vocab
  elif tokenizer_vocab > config.model.vocab_size:
    raise ConfigError(
        f'the tokenizer has {tokenizer_vocab} tokens but model.vocab_size='
        f'{config.model.vocab_size}; set model.vocab_size>={tokenizer_vocab} or 0 (auto).')


def _state_factory(config: ml_collections.ConfigDict,
                   build: Callable[[], nnx.Module] | None, wrt: Any):
  tx, schedule = make_optimizer(config.optimizer, config.steps,
                                lr_factor=ramp_lib.lr_factor(config))
  build = build or make_task(config).build_model

  def create():
    model = build()
    return model, nnx.Optimizer(model, tx, wrt=wrt)

  return create, schedule


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         build: Callable[[], nnx.Module] | None = None,
                         wrt: Any = nnx.Param) -> TrainState:
  """Shapes, dtypes and shardings of the train state; allocates nothing (AOT planning)."""
  create, schedule = _state_factory(config, build, wrt)
  rules = shd.rules_from_config(config.mesh)
  with shd.use_mesh(mesh, rules):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = shd.state_shardings(abstract_state, mesh, rules)
  abstract = ckpt_lib.abstract_with_shardings(abstract_state, shardings)
  return TrainState(graphdef, abstract, shardings, schedule)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       build: Callable[[], nnx.Module] | None = None,
                       wrt: Any = nnx.Param) -> TrainState:
  """Creates (model, optimizer) already sharded: eval_shape -> shardings -> jit init.

  No parameter is ever materialised whole on one device: the jitted initializer
  writes each shard where it lives.
  """
  create, schedule = _state_factory(config, build, wrt)
  rules = shd.rules_from_config(config.mesh)
  with shd.use_mesh(mesh, rules):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = shd.state_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
  return TrainState(graphdef, state, shardings, schedule)


# --------------------------------------------------------------------------- steps


def _micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, ... (stays shard-local)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _inject_nan(grads, step, at_step: int, regex: str):
  """Fault injection for tests: NaN gradients at ``at_step`` for matching params."""
  rx = re.compile(regex) if regex else None

  def leaf(path, g):
    if rx is not None and not rx.search(path_str(path)):
      return g
    return jnp.where(step == at_step, jnp.full_like(g, jnp.nan), g)

  return jax.tree_util.tree_map_with_path(leaf, grads)


def _nonfinite_report(loss, grads):
  """Whether the update is finite, and one flag per parameter (for the error report)."""
  flags = jax.tree.map(lambda g: jnp.logical_not(jnp.all(jnp.isfinite(g))), grads)
  finite = jnp.isfinite(loss) & jnp.logical_not(
      jnp.any(jnp.stack([f for f in jax.tree.leaves(flags)])))
  return finite, flags


def train_step(graphdef, state, batch, *, objective: Callable, accum_steps: int,
               wrt: Any = nnx.Param, nan_policy: str = 'stop', inject_nan_at_step: int = 0,
               inject_nan_regex: str = '', post_update: Callable | None = None):
  """One optimizer update, with gradients accumulated over ``accum_steps`` micro-batches.

  Each micro-batch's mean loss is weighted by its share of the batch's real tokens, so
  the accumulated gradient equals the full-batch gradient (not an average of means).
  With ``nan_policy='skip'`` a non-finite loss or gradient leaves the state unchanged
  (``skipped`` = 1 in the metrics); with 'stop' the host stops on the flag.
  """
  model, optimizer = nnx.merge(graphdef, state, copy=True)  # Keep `state` for 'skip'.
  gdef_m, params, rest = nnx.split(model, wrt, ...)
  total_tokens = jnp.maximum(batch['mask'].sum(), 1.0)

  def weighted_loss(params, rest, micro):
    m = nnx.merge(gdef_m, params, rest, copy=True)
    loss, aux = objective(m, micro, deterministic=False)
    weight = micro['mask'].sum() / total_tokens
    _, _, new_rest = nnx.split(m, wrt, ...)
    return loss * weight, (jax.tree.map(lambda a: a * weight, aux), new_rest)

  grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
  if accum_steps == 1:
    (loss, (aux, rest)), grads = grad_fn(params, rest, batch)
  else:
    def body(carry, micro):
      g_acc, l_acc, a_acc, rest = carry
      (l, (a, rest)), g = grad_fn(params, rest, micro)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
              jax.tree.map(jnp.add, a_acc, a), rest), None
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    aux_shapes = jax.eval_shape(
        lambda: grad_fn(params, rest, jax.tree.map(lambda x: x[0], _micro_batches(batch, accum_steps)))[0][1][0])
    zeros_a = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shapes)
    (grads, loss, aux, rest), _ = jax.lax.scan(
        body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a, rest),
        _micro_batches(batch, accum_steps))
  if inject_nan_at_step:
    grads = _inject_nan(grads, optimizer.step[...] + 1, inject_nan_at_step, inject_nan_regex)
  finite, nonfinite = _nonfinite_report(loss, grads)
  nnx.update(model, rest)
  optimizer.update(model, grads)
  if post_update is not None:  # E.g. pruning masks (research/compress/prune.py).
    post_update(model, optimizer.step[...])
  new_state = nnx.state((model, optimizer))
  if nan_policy == 'skip':
    # Keep the old params/optimizer moments, but let the step counter advance so it
    # stays equal to the host's step (schedules, ramps and fault injection rely on it).
    step_counter = new_state[1]['step']
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state[1]['step'] = step_counter
  out = {**aux, 'total_loss': loss, 'grad_norm': optax.tree.norm(grads),
         'weight': total_tokens, 'skipped': 1 - finite.astype(jnp.int32),
         'nonfinite': nonfinite}
  return new_state, out


def eval_step(graphdef, state, batch, *, objective: Callable):
  """Sums (aux mean x weight) over one batch, deterministic; divide by 'weight' later."""
  model, _ = nnx.merge(graphdef, state)
  _, aux = objective(model, batch, deterministic=True)
  weight = batch['mask'].sum()
  return {**jax.tree.map(lambda a: a * weight, aux), 'weight': weight}


# --------------------------------------------------------------------------- helpers


def check_finite(step: int, metrics: dict[str, Any], policy: str) -> None:
  """Under 'stop', raises naming the step and the first parameter with a bad gradient."""
  bad = [path_str(p).removesuffix('/value')
         for p, flag in jax.tree_util.tree_leaves_with_path(metrics['nonfinite']) if bool(flag)]
  where = f'first non-finite gradient: {bad[0]} ({len(bad)} parameters)' if bad else \
      'the loss itself is not finite'
  if policy == 'stop':
    raise NonFiniteError(
        f'non-finite loss/gradients at step {step}; {where}. Lower optimizer.learning_rate, '
        f'set loss.z_loss=1e-4, or set nan_policy=skip to drop such updates.')
  logging.warning('step %d: skipped a non-finite update (%s)', step, where)


def device_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
                 ) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays (same path for 1 or many processes)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def run_metadata(config, mesh, params: dict[str, int], corpus: dict[str, Any]) -> dict:
  dev = jax.devices()[0]
  return {
      'config': config.to_dict(),
      'jax_version': jax.__version__,
      'python_version': platform.python_version(),
      'device_kind': dev.device_kind,
      'platform': dev.platform,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'mesh_shape': dict(mesh.shape),
      'param_count': params,
      'corpus': corpus,
  }


def write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def evaluate(config, task: Task, tokenizer, eval_fn, train_state: TrainState, batch_sharding,
             process_index: int, process_count: int) -> dict[str, float]:
  """Task metrics over the first ``eval_steps`` batches of the validation split."""
  it = task.make_iterator(
      config, tokenizer, 'eval', batch_size_per_process=config.batch_size // process_count,
      process_index=process_index, process_count=process_count, shuffle=False, repeat=False)
  sums = None
  for i, batch in enumerate(it):
    if i >= config.eval_steps:
      break
    out = jax.device_get(eval_fn(train_state.state, device_batch(batch, batch_sharding)))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  if sums is None or float(sums['weight']) == 0:
    return {}
  return task.finalize_eval(sums)


def write_samples(config, tokenizer, train_state: TrainState, workdir: str,
                  is_main: bool) -> list[str]:
  """Decodes a few continuations of ``sample_prompt`` with the KV cache."""
  from research.decode import generate  # Late: only at the end of a run.
  if config.num_samples <= 0:
    return []
  model, _ = nnx.merge(train_state.graphdef, train_state.state)
  prompt = np.asarray(tokenizer.encode(config.sample_prompt), np.int32)
  if getattr(tokenizer, 'bos_id', None) is not None:
    prompt = np.concatenate([[tokenizer.bos_id], prompt]).astype(np.int32)
  room = config.model.max_seq_len - len(prompt)
  max_new = max(1, min(config.sample_len, room))
  prompts = np.tile(prompt[None], (config.num_samples, 1))
  tokens = generate(model, prompts, max_new_tokens=max_new,
                    rng=jax.random.key(config.seed), temperature=config.sample_temperature,
                    top_k=config.sample_top_k)
  texts = [tokenizer.decode(np.asarray(t).tolist()) for t in tokens]
  if is_main:
    with open(os.path.join(workdir, 'samples.txt'), 'w') as f:
      for i, t in enumerate(texts):
        f.write(f'===== sample {i} (temperature={config.sample_temperature}, '
                f'top_k={config.sample_top_k}) =====\n{t}\n')
  return texts


# --------------------------------------------------------------------------- main loop


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``config`` in ``workdir`` and returns the summary.

  ``stop_at_step`` ends the run early after checkpointing that step, as a preemption
  would; rerunning with the same workdir continues it exactly.
  """
  t_start = time.time()
  config = ml_collections.ConfigDict(config.to_dict())  # Own copy; we resolve values.
  validate_config(config, workdir)
  validate_quant_config(config.quant)
  if config.quant.mode == 'ptq':  # No training: quantize init_from's checkpoint.
    from research import quant
    return quant.run(config, workdir)
  if config.finetune.init_from:  # Fine-tuning: architecture + tokenizer of the source.
    from research.finetune import init as finetune_init
    finetune_init.prepare(config, workdir)
  if config.distill.teacher:  # Distillation: resolve (and maybe train) the teacher.
    from research.compress import distill
    distill.prepare(config, workdir)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  mesh = shd.mesh_from_config(config.mesh)
  rules = shd.rules_from_config(config.mesh)
  check_batch_divisibility(config, dict(mesh.shape), process_count)
  ramp = ramp_lib.validate(config, dict(mesh.shape), process_count)  # Batch per step.
  check_tensor_divisibility(config.model, mesh.shape['tensor'])
  sources.validate_data_config(config.data)

  tokenizer = tokenizers.make_tokenizer(config.data, workdir)
  if config.finetune.init_from:  # An HF source brings its tokenizer.json.
    tokenizer = finetune_init.source_tokenizer(config, tokenizer)
  resolve_vocab(config, tokenizer.vocab_size)
  task = make_task(config)
  train_iter = task.make_iterator(  # Batches of ramp.unit (batch_size without a ramp).
      config, tokenizer, 'train', batch_size_per_process=ramp.unit // process_count,
      process_index=process_index, process_count=process_count, shuffle=True, repeat=True)

  ts = create_train_state(config, mesh, task.build_model, wrt=task.trainable)
  model_view, _ = nnx.merge(ts.graphdef, ts.state)
  params = count_params(model_view)
  del model_view
  dims = resolved_dims(config.model)
  flops_per_token = metrics_lib.model_flops_per_token(
      params['non_embedding'], config.model.num_layers,
      config.model.num_heads * dims['head_dim'], config.seq_len)
  peak_flops, peak_source = metrics_lib.device_peak_flops()
  peak_total = peak_flops * jax.device_count()

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       max_to_keep=config.keep_checkpoints)
  start_step, tokens_seen = 0, 0
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = ckpt_lib.abstract_with_shardings(ts.state, ts.shardings)
    restored, meta = checkpointer.restore(latest, abstract, train_iter)
    ts.state = restored
    start_step, tokens_seen = int(meta['step']), int(meta['tokens_seen'])
    if tokens_seen != ramp.tokens_through(start_step, config.seq_len):
      logging.warning('Resumed tokens_seen=%d differs from %d implied by batch_size/'
                      'batch_ramp: the batch schedule changed since the checkpoint.',
                      tokens_seen, ramp.tokens_through(start_step, config.seq_len))
    logging.info('Resumed from step %d in %s', start_step, checkpointer.directory)
  elif config.quant.init_from:  # QAT fine-tuning: start from a float run's weights.
    from research import quant
    ts.state = quant.init_state_from(config, workdir, ts, mesh)
  elif config.task != 'lm' or config.finetune.init_from or config.finetune.mode != 'full':
    from research.finetune import init as finetune_init  # Load the backbone, report.
    ts.state = finetune_init.initialize(config, ts, task, workdir)
  if latest is None and task.initialize is not None:  # E.g. load a distillation teacher.
    ts.state = task.initialize(ts, workdir)

  corpus = sources.corpus_info(config.data)
  if is_main:
    meta = run_metadata(config, mesh, params, corpus)
    meta.update(peak_flops_per_device=peak_flops, peak_flops_source=peak_source,
                model_flops_per_token=flops_per_token)
    write_json(os.path.join(workdir, 'config.json'), meta)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main)
  logging.info('Model: %s params (%s non-embedding); mesh %s; %d devices',
               f'{params["total"]:,}', f'{params["non_embedding"]:,}', dict(mesh.shape),
               jax.device_count())

  batch_sharding = shd.named(mesh, ('batch', 'seq'), rules)
  step_fn = jax.jit(
      functools.partial(train_step, ts.graphdef, objective=task.objective,
                        accum_steps=config.optimizer.grad_accum_steps, wrt=task.trainable,
                        nan_policy=config.nan_policy,
                        inject_nan_at_step=config.debug.inject_nan_at_step,
                        inject_nan_regex=config.debug.inject_nan_regex,
                        post_update=task.post_update),
      in_shardings=(ts.shardings, batch_sharding), out_shardings=(ts.shardings, None),
      donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, ts.graphdef, objective=task.objective),
                    in_shardings=(ts.shardings, batch_sharding))

  last_eval: dict[str, float] = {}
  last_train: dict[str, float] = {}
  peak_tps, peak_mfu = 0.0, 0.0
  pending = None  # (step, device metrics) fetched one step late.
  window_t, window_steps = time.time(), 0
  time_to_first_step = None
  skipped_steps = 0

  def flush(pending_item, now):
    nonlocal window_t, window_steps, last_train, peak_tps, peak_mfu, time_to_first_step
    nonlocal skipped_steps
    step, seen, dev_metrics = pending_item
    m = jax.device_get(dev_metrics)
    if int(m['skipped']):
      check_finite(step, m, config.nan_policy)
      skipped_steps += 1
    window_steps += 1
    if time_to_first_step is None:  # The first step's time is mostly compilation.
      time_to_first_step = now - t_start
    if step % config.log_every and step != config.steps:
      return
    if window_steps == 0:
      return
    dt = (now - window_t) / window_steps
    tps = ramp.batch_size(step) * config.seq_len / dt
    mfu = tps * flops_per_token / peak_total
    if step > start_step + 1 and not ramp.new_size_in(step - window_steps + 1, step):
      # Throughput peaks exclude compiling steps (the first, and a ramp's new sizes).
      peak_tps, peak_mfu = max(peak_tps, tps), max(peak_mfu, mfu)
    task_metrics = {k: float(v) for k, v in m.items()
                    if k not in ('weight', 'total_loss', 'z_loss', 'nonfinite', 'skipped')}
    row = {'step': step, 'split': 'train', **task_metrics,
           'learning_rate': float(ts.schedule(step - 1)), 'batch_size': ramp.batch_size(step),
           'tokens_per_sec': tps, 'mfu': mfu, 'step_time_s': dt,
           'grad_norm': float(m['grad_norm']), 'tokens_seen': seen,
           'skipped_steps': skipped_steps}
    if config.loss.z_loss:
      row['z_loss'] = float(m['z_loss'])
    last_train = row
    writer.write(row)
    eta = metrics_lib.format_duration(dt * (config.steps - step))
    logging.info('step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  mfu %.1f%%  %.3fs/step  eta %s',
                 step, config.steps, row['loss'], row['learning_rate'], tps, 100 * mfu, dt, eta)
    window_t, window_steps = now, 0

  def save(step):
    checkpointer.save(step, ts.state, {'step': step, 'tokens_seen': tokens_seen}, train_iter)
    if step == config.debug.sigkill_after_save_step:  # Fault injection: die mid-save.
      os.kill(os.getpid(), signal.SIGKILL)

  with shd.use_mesh(mesh, rules), preemption.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, config.steps + 1):
      batch = device_batch(ramp.next_batch(train_iter, step), batch_sharding)
      ts.state, dev_metrics = step_fn(ts.state, batch)
      tokens_seen += ramp.batch_size(step) * config.seq_len
      if pending is not None:
        flush(pending, time.time())
      pending = (step, tokens_seen, dev_metrics)
      if step % config.checkpoint_every == 0 or step == config.steps:
        save(step)
      if config.eval_steps and (step % config.eval_every == 0 or step == config.steps):
        flush(pending, time.time())
        pending = None
        last_eval = evaluate(config, task, tokenizer, eval_fn, ts, batch_sharding,
                             process_index, process_count)
        if last_eval:
          writer.write({'step': step, 'split': 'eval', **last_eval})
          logging.info('eval step %d  loss %.4f', step, last_eval['loss'])
        window_t, window_steps = time.time(), 0
      preempted = watcher.should_stop(step)
      if (preempted or stop_at_step is not None and step >= stop_at_step) and step < config.steps:
        if step % config.checkpoint_every:
          save(step)
        if pending is not None:
          flush(pending, time.time())
        writer.close()
        checkpointer.close()
        if preempted:
          logging.warning('Preempted: saved step %d; exiting with code 75.', step)
          raise preemption.Preempted(step)
        return {'stopped_at_step': step, 'tokens_seen': tokens_seen}
    if pending is not None:
      flush(pending, time.time())
    checkpointer.wait()
    samples = (write_samples(config, tokenizer, ts, workdir, is_main)
               if task.decode_samples else [])
  for i, s in enumerate(samples):
    logging.info('sample %d:\n%s', i, s)

  summary = {
      'steps': config.steps, 'tokens_seen': tokens_seen,
      'final_train_loss': last_train.get('loss'), 'final_eval_loss': last_eval.get('loss'),
      'wall_time_s': time.time() - t_start, 'time_to_first_step_s': time_to_first_step,
      'param_count': params['total'], 'param_count_non_embedding': params['non_embedding'],
      'peak_tokens_per_sec': peak_tps, 'peak_mfu': peak_mfu,
      'resumed_from_step': start_step, 'skipped_steps': skipped_steps,
  }
  if task.at_end is not None:  # E.g. the per-layer sparsity report.
    summary.update(task.at_end(ts, workdir, is_main) or {})
  if is_main:
    write_json(os.path.join(workdir, 'summary.json'), summary)
  writer.close()
  checkpointer.close()
  return summary
