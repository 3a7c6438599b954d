r"""Evaluates any run directory at any step: LM loss on an eval split, downstream tasks.

  python -m launch.eval --run=DIR [--step=N | --steps=N,M,...|all] [--eval_tokens=N|-1]
      [--config.KEY=VALUE ...] [--tasks=stdlib_mc,arc:FILE.jsonl,...] [--limit=N]
      [--nolm_eval] [--out=FILE.json] [--write_metrics]

DIR is a ``--workdir`` of launch.train, an export of one, or a Hugging Face checkpoint
directory (research/run_source.py); the work is research/eval_run.py. The LM eval is the trainer's own
(research/evaluate.py) on the run's eval split, or on what ``--config.data.*`` overrides
name; ``--eval_tokens`` -1 reads the whole split, N > 0 the first N tokens (default: the
run's own setting). ``--tasks`` adds multiple-choice tasks (research/downstream/tasks.py).

Prints ONE JSON object on stdout: ``run``, ``kind``, ``step``, ``loss``,
``perplexity`` (exp of the loss per token), ``num_tokens``, the task's other eval
metrics, ``tasks`` {name: acc, acc_low, acc_high (95% Wilson), acc_norm..., n, chance}
and ``seconds``. Logs go to stderr. With ``--steps``: ``{run, kind, steps: [one such
object per step], paired: {task: acc_change, acc_norm_change and their 95% paired-
bootstrap intervals from the first to the last step}}``.

Nothing is written into DIR unless ``--write_metrics``: then the rows are appended to
DIR/metrics.jsonl (split ``posthoc_eval`` for the LM eval, ``downstream/NAME`` per task),
for runs and exports of ours only; an HF directory is a read-only source and is refused.
Exit codes: 0 done; 1 error (one line ``error: ...`` on stderr).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from launch import run_flags
from research import runtime

_RUN, _STEP = run_flags.define_run_flags()
_STEPS = flags.DEFINE_list('steps', [], 'Several steps (e.g. 100,200,400 or "all"): one '
                           'result per step and the paired change of each task from the '
                           'first to the last step.')
_EVAL_TOKENS = flags.DEFINE_integer(
    'eval_tokens', None, 'Eval tokens: -1 the whole split, N > 0 the first N, 0 the first '
    'eval_steps batches; default: the run\'s own setting.')
_TASKS = flags.DEFINE_string('tasks', '', 'Downstream tasks, comma-separated specs.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Score only the first N examples of each task.')
_LM_EVAL = flags.DEFINE_boolean('lm_eval', True, 'Run the LM eval (--nolm_eval: tasks only).')
_OUT = flags.DEFINE_string('out', '', 'Also write the JSON object to this file.')
_WRITE_METRICS = flags.DEFINE_boolean(
    'write_metrics', False, 'Append the results to the run\'s metrics.jsonl (ours only).')
_BATCH = flags.DEFINE_integer('task_batch_size', 32, 'Rows per scoring batch of the tasks.')
run_flags.define_config_overrides()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_flags.required_run(_RUN)
  overrides = run_flags.config_overrides()
  if _EVAL_TOKENS.value is not None:
    overrides['eval_tokens'] = _EVAL_TOKENS.value
  if _WRITE_METRICS.value:
    from research import run_source
    kind = run_source.kind_of(run_source.runs.resolve(_RUN.value))
    if kind == 'hf':
      raise runtime.UserError(f'--write_metrics: {_RUN.value} is a Hugging Face directory, a '
                              f'read-only source; use --out=FILE.json instead.')
  from research import eval_run
  args = (overrides, _TASKS.value, _LIMIT.value, _LM_EVAL.value, _BATCH.value)
  if _STEPS.value:
    result = eval_run.evaluate_steps(_RUN.value, _STEPS.value, *args)
  else:
    result = eval_run.evaluate_run(_RUN.value, _STEP.value, *args)
  if _WRITE_METRICS.value:
    from research.downstream import results
    rows = [r for one in result.get('steps', [result]) for r in eval_run.metrics_rows(one)]
    result['metrics_file'] = results.append_rows(result['run'], rows)
  text = json.dumps(result, sort_keys=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')
  print(text, flush=True)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
