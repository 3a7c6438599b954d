"""What ``launch.eval`` computes, importable: one run directory (any kind,
research/run_source.py) at one or several steps -> the LM eval of research/evaluate.py
and the downstream tasks of research/downstream/, as one JSON-able dict."""

from __future__ import annotations

import math
import time

from research.runtime import UserError

POSTHOC_SPLIT = 'posthoc_eval'


def evaluate_run(run: str, step: int = -1, overrides: dict | None = None,
                 tasks: str = '', limit: int = 0, lm_eval: bool = True,
                 task_batch_size: int = 32, per_example: bool = False) -> dict:
  """The JSON object the command prints (see module doc)."""
  from research import recipe, run_source
  from research.downstream import tasks as tasks_lib
  from research.evaluate import evaluate_model
  from research.evaluate import validate as validate_eval
  t = time.time()
  specs = tasks_lib.parse_specs(tasks)  # Spec errors before anything is loaded.
  loaded = run_source.load(run, step, overrides)
  validate_eval(loaded.config)
  out: dict = loaded.describe()
  if lm_eval:
    from research.config import ConfigError
    from research.validation import validate_config
    validate_config(loaded.config)
    from research.sharding import batch_shards
    shards = batch_shards(dict(loaded.mesh.shape))
    if loaded.config.batch_size % shards:
      raise ConfigError(f'batch_size={loaded.config.batch_size} must be a multiple of the '
                        f'{shards} data shards of this mesh; pass --config.batch_size='
                        f'{shards * max(1, loaded.config.batch_size // shards)}.')
    task = recipe.compose_task(loaded.config)
    metrics = evaluate_model(loaded.config, task, loaded.tokenizer, loaded.model, loaded.mesh)
    if not metrics:
      raise UserError(f'the eval split of {loaded.path} is empty (data.* as '
                              f'overridden?); nothing was evaluated.')
    out.update({k: float(v) for k, v in metrics.items()})
    out['num_tokens'] = int(metrics['num_tokens'])
    if 'loss' in metrics:
      out['perplexity'] = math.exp(min(float(metrics['loss']), 700.0))
    out['eval_tokens'] = int(loaded.config.eval_tokens)
  if specs:
    with run_source.use_mesh(loaded):
      out['tasks'] = tasks_lib.run_tasks(specs, loaded.model, loaded.tokenizer,
                                         max_len=loaded.context_len, config=loaded.config,
                                         limit=limit, batch_size=task_batch_size,
                                         per_example=per_example)
  out['seconds'] = round(time.time() - t, 1)
  return out


def evaluate_steps(run: str, steps: list[str], overrides: dict | None = None,
                   tasks: str = '', limit: int = 0, lm_eval: bool = True,
                   task_batch_size: int = 32) -> dict:
  """``{run, steps: [one result per step], paired: {task: change first -> last}}``."""
  from research import runs
  from research.downstream import tasks as tasks_lib
  path = runs.resolve(run)
  wanted = (runs.checkpoint_steps(path) if steps == ['all']
            else [runs.pick_step(path, int(s), '--steps') for s in steps])
  out = [evaluate_run(run, s, overrides, tasks, limit, lm_eval, task_batch_size,
                      per_example=True) for s in wanted]
  paired = {}
  if len(out) > 1:
    for name in out[0].get('tasks', {}):
      paired[name] = {'from_step': out[0]['step'], 'to_step': out[-1]['step'],
                      **tasks_lib.paired_change(out[0]['tasks'][name],
                                                out[-1]['tasks'][name])}
  for one in out:
    for task in one.get('tasks', {}).values():
      task.pop('per_example', None)
  return {'run': out[0]['run'], 'kind': out[0]['kind'], 'steps': out, 'paired': paired}


def metrics_rows(result: dict) -> list[dict]:
  from research.downstream import results
  rows = []
  if 'loss' in result:
    rows.append({'step': int(result['step'] or 0), 'split': POSTHOC_SPLIT,
                 **{k: result[k] for k in ('loss', 'perplexity', 'num_tokens', 'eval_tokens')
                    if k in result}})
  rows += results.rows(result.get('tasks', {}), result['step'])
  return rows
