"""The trainer: trains a composed task on a config, and nothing else.

Flow (each step is a function below or in the modules named):
  mesh -> batch checks -> data iterator -> sharded state (research/train_state.py) ->
  restore the latest checkpoint if the workdir has one, else the task's initialize hook
  -> the jitted step (research/step.py) in a loop -> final eval, samples, summary.

What a run is (fine-tuning, LoRA, QAT, distillation, pruning) is decided by the recipe
layer (research/recipe.py), which hands this module a :class:`research.tasks.Task`
with its wrappers applied; the trainer imports no feature package and has no feature
branches. The host never waits on a step before dispatching the next: the metrics of
step s are fetched after step s+1 has been dispatched.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research import batch_ramp as ramp_lib
from research import checkpoint as ckpt_lib
from research import metrics as metrics_lib
from research import preemption
from research.progress import Progress
from research import resume_check
from research import runs
from research import sharding as shd
from research import step as step_lib
from research.config import ConfigError
from research.data import catalog
from research.downstream import tasks as downstream
from research.evaluate import evaluate
from research.feature_validation import active_features
from research.models.transformer import count_params, resolved_dims
from research.optim import path_str
from research.runtime import UserError
from research.tasks import Task
from research.train_state import TrainState, create_train_state
from research.validation import check_batch_divisibility, check_tensor_divisibility


class NonFiniteError(UserError, FloatingPointError):
  """The loss or a gradient was NaN/inf under nan_policy='stop'."""


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


def check_composed(config: ml_collections.ConfigDict, task: Task) -> None:
  """The task carries exactly the wrappers the config asks for (research/recipe.py)."""
  want = active_features(config)
  if tuple(task.features) != want:
    raise ConfigError(
        f'this config needs the features {list(want)} but the task has '
        f'{list(task.features)}; run it through research.recipe.run (launch.train does).')


# --------------------------------------------------------------------------- main loop


def train(config: ml_collections.ConfigDict, workdir: str, *, task: Task, tokenizer: Any,
          stop_at_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) ``task`` on validated ``config`` in ``workdir``; the summary.

  ``config`` is resolved (model.vocab_size set from ``tokenizer``); ``task`` is the
  composed task of research/recipe.py. ``stop_at_step`` ends the run early after
  checkpointing that step, as a preemption would; rerunning continues it exactly.
  """
  t_start = time.time()
  check_composed(config, task)
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  mesh = shd.mesh_from_config(config.mesh)
  rules = shd.rules_from_config(config.mesh)
  check_batch_divisibility(config, dict(mesh.shape), process_count)
  ramp = ramp_lib.validate(config, dict(mesh.shape), process_count)  # Batch per step.
  check_tensor_divisibility(config.model, mesh.shape['tensor'])
  train_iter = task.make_iterator(  # Batches of ramp.unit (batch_size without a ramp).
      config, tokenizer, 'train', batch_size_per_process=ramp.unit // process_count,
      process_index=process_index, process_count=process_count, shuffle=True, repeat=True)

  ts = create_train_state(config, mesh, task)
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
  corpus = catalog.corpus_info(config.data)
  fingerprint = resume_check.fingerprint(config, tokenizer, corpus)
  latest = checkpointer.latest_step()
  if latest is not None:
    saved = checkpointer.read_meta(latest)  # Checked before anything is restored.
    if saved is not None:
      resume_check.check(saved.get('fingerprint'), fingerprint, workdir=workdir,
                         step=latest, enforce=config.resume_check)
    abstract = ckpt_lib.abstract_with_shardings(ts.state, ts.shardings)
    restored, meta = checkpointer.restore(latest, abstract, train_iter)
    ts.state = restored
    start_step, tokens_seen = int(meta['step']), int(meta['tokens_seen'])
    logging.info('Resumed from step %d in %s', start_step, checkpointer.directory)
  elif task.initialize is not None:  # E.g. a pretrained backbone, a teacher's weights.
    ts.state = task.initialize(ts, workdir)

  if is_main:
    meta = runs.run_metadata(config, mesh, params, corpus)
    meta.update(peak_flops_per_device=peak_flops, peak_flops_source=peak_source,
                model_flops_per_token=flops_per_token)
    runs.write_json(os.path.join(workdir, runs.CONFIG), meta)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, enabled=is_main,
                                     config=config)
  logging.info('Model: %s params (%s non-embedding); mesh %s; %d devices',
               f'{params["total"]:,}', f'{params["non_embedding"]:,}', dict(mesh.shape),
               jax.device_count())

  batch_sharding = step_lib.batch_sharding(mesh, config)
  step_fn = step_lib.make_train_step(config, task, ts, batch_sharding)
  eval_fn = step_lib.make_eval_step(task, ts.graphdef, ts.shardings, batch_sharding)

  last_eval: dict[str, float] = {}
  progress = Progress(config, writer, ramp, ts.schedule, flops_per_token=flops_per_token,
                      peak_total=peak_total, start_step=start_step, t_start=t_start)
  pending = None  # (step, tokens seen, device metrics) fetched one step late.

  def flush(pending_item):
    step, seen, dev_metrics = pending_item
    m = jax.device_get(dev_metrics)
    if int(m['skipped']):
      check_finite(step, m, config.nan_policy)
    progress.record(step, seen, m, time.time())

  def save(step):
    checkpointer.save(step, ts.state, {'step': step, 'tokens_seen': tokens_seen,
                                       'fingerprint': fingerprint}, train_iter)
    if step == config.debug.sigkill_after_save_step:  # Fault injection: die mid-save.
      os.kill(os.getpid(), signal.SIGKILL)

  with shd.use_mesh(mesh, rules), preemption.PreemptionWatcher() as watcher:
    for step in range(start_step + 1, config.steps + 1):
      batch = device_batch(ramp.next_batch(train_iter, step), batch_sharding)
      ts.state, dev_metrics = step_fn(ts.state, batch)
      tokens_seen += ramp.batch_size(step) * config.seq_len
      if pending is not None:
        flush(pending)
      pending = (step, tokens_seen, dev_metrics)
      if step % config.checkpoint_every == 0 or step == config.steps:
        flush(pending)  # A non-finite step stops before it can be saved.
        pending = None
        save(step)
      if config.eval_steps and (step % config.eval_every == 0 or step == config.steps):
        if pending is not None:
          flush(pending)
        pending = None
        last_eval = evaluate(config, task, tokenizer, eval_fn, ts, batch_sharding,
                             process_index, process_count)
        if last_eval:
          writer.write({'step': step, 'split': 'eval', **last_eval})
          logging.info('eval step %d  loss %.4f', step, last_eval['loss'])
        if config.eval_tasks:  # Downstream multiple-choice scores (research/downstream).
          for row in downstream.evaluate_rows(config.eval_tasks,
                                              nnx.merge(ts.graphdef, ts.state)[0],
                                              tokenizer, config, step):
            writer.write(row)
        progress.reset_window(time.time())
      preempted = watcher.should_stop(step)
      if (preempted or stop_at_step is not None and step >= stop_at_step) and step < config.steps:
        if pending is not None:
          flush(pending)
        if step % config.checkpoint_every:
          save(step)
        writer.close()
        checkpointer.close()
        if preempted:
          logging.warning('Preempted: saved step %d; exiting with code 75.', step)
          raise preemption.Preempted(step)
        return {'stopped_at_step': step, 'tokens_seen': tokens_seen}
    if pending is not None:
      flush(pending)
    checkpointer.wait()
    samples = (write_samples(config, tokenizer, ts, workdir, is_main)
               if task.decode_samples else [])
  for i, s in enumerate(samples):
    logging.info('sample %d:\n%s', i, s)

  summary = {
      'steps': config.steps, 'tokens_seen': tokens_seen,
      'final_train_loss': progress.last_train.get('loss'),
      'final_eval_loss': last_eval.get('loss'),
      'wall_time_s': time.time() - t_start,
      'time_to_first_step_s': progress.time_to_first_step,
      'param_count': params['total'], 'param_count_non_embedding': params['non_embedding'],
      'peak_tokens_per_sec': progress.peak_tps, 'peak_mfu': progress.peak_mfu,
      'resumed_from_step': start_step, 'skipped_steps': progress.skipped_steps,
  }
  if task.at_end is not None:  # E.g. the per-layer sparsity report.
    summary.update(task.at_end(ts, workdir, is_main) or {})
  if is_main:
    runs.write_json(os.path.join(workdir, runs.SUMMARY), summary)
  writer.write_hparams(config, {'final_eval_loss': summary['final_eval_loss'],
                                'final_train_loss': summary['final_train_loss']})
  writer.close()
  checkpointer.close()
  return summary
