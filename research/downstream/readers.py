"""Multiple-choice datasets in the three common shapes, from local JSONL or TFDS.

Each reader turns one record into a :class:`MCExample` with lm-evaluation-harness's
zero-shot prompt for that task (choices follow the context after a space):

* ``hellaswag``: ``{"ctx", "endings": [4], "label"}`` (the HF dataset's
  ``activity_label``/``ctx_a``/``ctx_b`` are used as the harness does when present,
  with its bracket-tag clean-up); TFDS has no HellaSwag builder in tfds 4.9, so local
  JSONL only.
* ``arc``: ``{"question", "choices": {"text": [...], "label": [...]}, "answerKey"}``;
  prompt ``"Question: {question}\nAnswer:"``. TFDS ``ai2_arc/ARC-Challenge`` (default,
  split ``test``) or ``ai2_arc/ARC-Easy`` (its labels are class ids; same rule).
* ``piqa``: ``{"goal", "sol1", "sol2", "label"}``; prompt
  ``"Question: {goal}\nAnswer:"``. TFDS ``piqa`` (split ``validation``).

Records without a usable gold label (HellaSwag's unlabeled test split: ``label`` ""
or -1; an ARC answer key not among its choice labels) are skipped and counted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable

import numpy as np

from research.downstream.scoring import MCExample
from research.runtime import UserError


class TaskError(UserError, ValueError):
  """A downstream task that cannot be read as asked; the message says what to fix."""


def _text(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode('utf-8')
  if isinstance(x, np.ndarray) and x.shape == ():
    return _text(x.item())
  return str(x)


def _int(x: Any) -> int | None:
  try:
    v = int(np.asarray(x).item()) if not isinstance(x, str) else int(x)
  except (TypeError, ValueError):
    return None
  return v


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(rec: dict[str, Any]) -> MCExample | None:
  if 'ctx_a' in rec:
    ctx = _text(rec['ctx_a']) + ' ' + _text(rec.get('ctx_b', '')).capitalize()
  else:
    ctx = _text(rec.get('ctx', rec.get('context', '')))
  if rec.get('activity_label'):
    ctx = _text(rec['activity_label']) + ': ' + ctx
  endings = tuple(_hellaswag_clean(_text(e)) for e in rec['endings'])
  label = _int(rec.get('label'))
  if label is None or not 0 <= label < len(endings):
    return None
  return MCExample(_hellaswag_clean(ctx), endings, label, ' ', _text(rec.get('ind', '')))


def arc(rec: dict[str, Any]) -> MCExample | None:
  choices = rec['choices']
  texts = tuple(_text(t) for t in choices['text'])
  labels = [_text(x) for x in choices['label']]
  key = _text(rec['answerKey'])
  if key not in labels:
    return None
  return MCExample(f'Question: {_text(rec["question"])}\nAnswer:', texts, labels.index(key),
                   ' ', _text(rec.get('id', '')))


def piqa(rec: dict[str, Any]) -> MCExample | None:
  context = f'Question: {_text(rec["goal"])}\nAnswer:'
  choices = (_text(rec['sol1']), _text(rec['sol2']))
  label = _int(rec.get('label'))
  if label not in (0, 1):
    return None
  return MCExample(context, choices, label, ' ', _text(rec.get('id', '')))


READERS: dict[str, Callable[[dict[str, Any]], MCExample | None]] = {
    'hellaswag': hellaswag, 'arc': arc, 'piqa': piqa}
# (default TFDS name, default split) of each shape; None: no TFDS builder.
TFDS_DEFAULTS: dict[str, tuple[str, str] | None] = {
    'hellaswag': None, 'arc': ('ai2_arc/ARC-Challenge', 'test'),
    'piqa': ('piqa', 'validation')}


def _convert(shape: str, records: Iterable[dict[str, Any]], where: str
             ) -> tuple[list[MCExample], int]:
  reader = READERS[shape]
  out, skipped = [], 0
  for i, rec in enumerate(records):
    try:
      ex = reader(rec)
    except (KeyError, TypeError) as e:
      raise TaskError(f'{where}: record {i} is not in the {shape} shape (missing {e}); '
                      f'see research/downstream/readers.py for the fields.') from None
    if ex is None:
      skipped += 1
    else:
      out.append(ex)
  return out, skipped


def read_jsonl(shape: str, path: str) -> tuple[list[MCExample], int]:
  """(examples, records skipped) of a local JSONL file in ``shape``."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise TaskError(f'{shape}: no such file {path!r}; give a JSONL file in the {shape} '
                    f'shape (or {shape}:tfds where TFDS has it).')
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except ValueError:
          raise TaskError(f'{path}:{n} is not JSON; one record per line.') from None
  return _convert(shape, records, path)


def read_tfds(shape: str, name: str = '', split: str = '') -> tuple[list[MCExample], int]:
  """(examples, skipped) of a TFDS dataset (prepared locally; read without TensorFlow)."""
  default = TFDS_DEFAULTS[shape]
  if default is None and not name:
    raise TaskError(f'{shape}: TFDS has no {shape} builder; use {shape}:PATH.jsonl.')
  name = name or default[0]
  split = split or default[1]
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for "not prepared".
    raise TaskError(f'{shape}: cannot read TFDS {name!r} split {split!r} '
                    f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); prepare it '
                    f'once with network access (tfds build {name}).') from None
  return _convert(shape, (source[i] for i in range(len(source))), f'tfds:{name}')
