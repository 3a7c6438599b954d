"""Downstream task specs (the ``--tasks`` flag) and running them on a loaded model.

A spec is ``[NAME=]KIND[:SOURCE]``:

* ``stdlib_mc``: the offline task (research/downstream/stdlib_task.py), held out by the
  evaluated run's ``data.eval_fraction`` when it pretrained on ``data.source=stdlib``
  (else by the default 0.05; the result says which);
* ``hellaswag:FILE.jsonl``, ``arc:FILE.jsonl``, ``piqa:FILE.jsonl``: local JSONL in that
  shape (research/downstream/readers.py);
* ``arc:tfds`` / ``piqa:tfds`` (TFDS defaults) or ``arc:tfds:ai2_arc/ARC-Easy:test``
  (TFDS name and split).

``NAME`` (default: ``KIND``) names the result: the ``downstream/NAME`` split of its
``metrics.jsonl`` rows and the ``NAME/...`` columns of sweep tables.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Sequence

from research.downstream import readers, stdlib_task
from research.downstream.scoring import MCExample, score
from research.downstream.stats import wilson_interval
from research.downstream.readers import TaskError

KINDS = ('stdlib_mc', 'hellaswag', 'arc', 'piqa')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str
  source: str = ''  # '' (stdlib_mc), a JSONL path, or 'tfds'.
  tfds_name: str = ''
  tfds_split: str = ''


def parse_spec(spec: str) -> TaskSpec:
  spec = spec.strip()
  name, eq, rest = spec.partition('=')
  if not eq or ':' in name or '/' in name:
    name, rest = '', spec
  kind, _, source = rest.partition(':')
  if kind not in KINDS:
    raise TaskError(f'--tasks: unknown task {kind!r} in {spec!r}; use stdlib_mc, or '
                    f'hellaswag|arc|piqa:FILE.jsonl, or arc|piqa:tfds[:NAME:SPLIT].')
  if name and not re.fullmatch(r'[A-Za-z0-9_.-]+', name):
    raise TaskError(f'--tasks: task name {name!r} may only use letters, digits, _ . -')
  if kind == 'stdlib_mc':
    if source:
      raise TaskError(f'--tasks: stdlib_mc takes no source (got {source!r}).')
    return TaskSpec(name or kind, kind)
  if not source:
    raise TaskError(f'--tasks: {kind} needs a source: {kind}:FILE.jsonl or {kind}:tfds.')
  if source == 'tfds' or source.startswith('tfds:'):
    parts = source.split(':')
    if len(parts) not in (1, 3):
      raise TaskError(f'--tasks: {spec!r}: write {kind}:tfds or {kind}:tfds:NAME:SPLIT.')
    tname, tsplit = (parts[1], parts[2]) if len(parts) == 3 else ('', '')
    return TaskSpec(name or kind, kind, 'tfds', tname, tsplit)
  return TaskSpec(name or kind, kind, source)


def parse_specs(text: str | Sequence[str]) -> list[TaskSpec]:
  items = text.split(',') if isinstance(text, str) else list(text)
  specs = [parse_spec(s) for s in items if s.strip()]
  names = [s.name for s in specs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise TaskError(f'--tasks: two tasks named {dup[0]!r}; name them NAME=KIND:SOURCE.')
  return specs


def stdlib_eval_fraction(config) -> tuple[float, bool]:
  """(eval_fraction to hold out by, whether it is the evaluated run's own split)."""
  data = getattr(config, 'data', None)
  if data is not None and data.source == 'stdlib':
    return float(data.eval_fraction), True
  return 0.05, False


def load_examples(spec: TaskSpec, config=None) -> tuple[list[MCExample], dict[str, Any]]:
  """(examples, info: chance level, counts, where they came from) of a task."""
  if spec.kind == 'stdlib_mc':
    fraction, own = stdlib_eval_fraction(config)
    task = stdlib_task.build(fraction)
    return list(task.examples), {**task.info, 'held_out_of_run': own}
  if spec.source == 'tfds':
    examples, skipped = readers.read_tfds(spec.kind, spec.tfds_name, spec.tfds_split)
    where = f'tfds:{spec.tfds_name or readers.TFDS_DEFAULTS[spec.kind][0]}'
  else:
    examples, skipped = readers.read_jsonl(spec.kind, spec.source)
    where = spec.source
  if not examples:
    raise TaskError(f'--tasks: {spec.name}: no labelled example in {where} '
                    f'({skipped} skipped).')
  counts = {len(e.choices) for e in examples}
  chance = sum(1.0 / len(e.choices) for e in examples) / len(examples)
  return examples, {'task': spec.kind, 'source': where, 'skipped': skipped,
                    'num_choices': sorted(counts), 'chance': chance}


def summarize(acc, acc_norm, chance: float) -> dict[str, Any]:
  """Accuracies with 95% Wilson intervals (research/downstream/stats.py)."""
  n = int(len(acc))
  out: dict[str, Any] = {'n': n, 'chance': chance, 'ci': 'wilson95'}
  for key, hits in (('acc', acc), ('acc_norm', acc_norm)):
    k = float(sum(hits))
    lo, hi = wilson_interval(k, n)
    out.update({key: k / n if n else 0.0, f'{key}_low': lo, f'{key}_high': hi})
  return out


def run_task(spec: TaskSpec, model, tokenizer, *, max_len: int, config=None, limit: int = 0,
             batch_size: int = 32, per_example: bool = False) -> dict[str, Any]:
  """Scores ``spec``'s examples (the first ``limit`` when > 0) with ``model``;
  ``per_example`` adds ``per_example: {acc: [0/1...], acc_norm: [...]}``."""
  t = time.time()
  examples, info = load_examples(spec, config)
  if limit:
    examples = examples[:limit]
  result = score(model, tokenizer, examples, max_len=max_len, batch_size=batch_size)
  out = summarize(result.acc, result.acc_norm, info['chance'])
  out.update(name=spec.name, seconds=round(time.time() - t, 1), max_len=max_len,
             **{k: v for k, v in info.items() if k not in ('chance', 'examples')})
  if per_example:
    out['per_example'] = {'acc': result.acc.astype(int).tolist(),
                          'acc_norm': result.acc_norm.astype(int).tolist()}
  return out


def run_tasks(specs: Sequence[TaskSpec], model, tokenizer, *, max_len: int, config=None,
              limit: int = 0, batch_size: int = 32, per_example: bool = False
              ) -> dict[str, dict[str, Any]]:
  return {s.name: run_task(s, model, tokenizer, max_len=max_len, config=config, limit=limit,
                           batch_size=batch_size, per_example=per_example) for s in specs}


def paired_change(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
  """acc and acc_norm change from one evaluation to another of the same examples
  (``per_example`` results), with 95% paired-bootstrap intervals."""
  from research.downstream.stats import paired_bootstrap_diff
  out = {}
  for key in ('acc', 'acc_norm'):
    diff, lo, hi = paired_bootstrap_diff(first['per_example'][key], last['per_example'][key])
    out.update({f'{key}_change': diff, f'{key}_change_low': lo, f'{key}_change_high': hi})
  out['ci'] = 'paired_bootstrap95'
  return out


def evaluate_rows(specs: str | Sequence[str], model, tokenizer, config, step: int, *,
                  limit: int = 0) -> list[dict[str, Any]]:
  """The ``metrics.jsonl`` rows of ``specs`` for ``model`` at ``step``: the one call a
  training loop needs to score tasks during training (run it under the run's mesh;
  the context length is the run's ``seq_len``)."""
  from research.downstream import results
  max_len = int(min(config.seq_len, config.model.max_seq_len))
  out = run_tasks(parse_specs(specs), model, tokenizer, max_len=max_len, config=config,
                  limit=limit)
  return results.rows(out, step)
