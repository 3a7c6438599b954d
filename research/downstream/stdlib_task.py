"""``stdlib_mc``: an offline multiple-choice task built from the held-out stdlib files.

**Which line comes next in this function?** The context is a function of the Python
standard library up to (not including) one of its one-line statements; the choices are
that real next line and ``num_choices - 1`` distractor lines: one-line statements at
the same indentation and of about the same length (within 20%, at least 3 characters)
taken from functions of *other* held-out files. Chance is
``1 / num_choices`` (25% with the default 4 choices). Same indentation and about the
same length mean neither the layout nor the length gives the answer away (the summed
log-likelihood favours short choices); the model has to use the context.

Held out from pretraining: every function (true line, context and distractors alike)
comes from a file that the corpus split puts in eval
(``research.data.sources.path_in_eval(path, data.eval_fraction)``, the hash of the
file's path), and a function whose text also occurs in a training file is dropped.
So a ``data.source='stdlib'`` run with the same ``data.eval_fraction`` (default 0.05)
never trained on any of it. Functions are extracted with ``ast`` by
research/data/functions_task.py (cached).

Deterministic: which statements, which distractors and where the answer sits are
decided by SHA-1 hashes of the paths and texts (and a ``random.Random`` seeded by
one), so every machine with the same Python
builds the same examples (``info['fingerprint']`` hashes them all).

A candidate statement is a single-line ``Assign``/``AugAssign``/``AnnAssign``/
``Return``/``Expr`` (a call)/``Raise``/``Assert``/``Import``/``Delete`` of at least
``MIN_LINE_CHARS`` characters that is not the function's first line or docstring; at
most ``per_function`` of them per function (0: all), each (file, line text) once. With
Python 3.11.7 and ``eval_fraction=0.05``: 1,191 examples from 786 functions of 24 files
(``per_function=0``, every statement: 2,293, a harder set: see README).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import bisect
import hashlib
import platform
import random
from typing import Any

from research.data import functions_task, sources
from research.downstream.scoring import MCExample

NAME = 'stdlib_mc'
MIN_LINE_CHARS = 12
LENGTH_TOLERANCE = 0.2  # Distractor length within 20% (at least 3 chars) of the true line.
_STATEMENTS = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Expr, ast.Raise,
               ast.Assert, ast.Import, ast.ImportFrom, ast.Delete)


def _h(*parts: object) -> str:
  return hashlib.sha1('\x00'.join(map(str, parts)).encode('utf-8')).hexdigest()


@dataclasses.dataclass(frozen=True)
class Candidate:
  path: str
  qualname: str
  line_index: int  # 0-based line of the statement in the dedented function text.
  indent: str
  text: str  # The statement's line without its indentation.


def candidate_lines(fn: functions_task.Function) -> list[Candidate]:
  """The one-line statements of ``fn`` eligible as a true next line (module doc)."""
  try:
    node = ast.parse(fn.text).body[0]
  except (SyntaxError, IndexError):
    return []
  docstring = None
  if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
      getattr(node.body[0], 'value', None), ast.Constant) and isinstance(
          node.body[0].value.value, str):
    docstring = node.body[0]
  lines = fn.text.splitlines()
  out = []
  for stmt in ast.walk(node):
    if not isinstance(stmt, _STATEMENTS) or stmt is docstring:
      continue
    if stmt.lineno != stmt.end_lineno or stmt.lineno <= 1:
      continue
    if isinstance(stmt, ast.Expr) and not isinstance(stmt.value, ast.Call):
      continue  # Bare strings, names: docstring-like or meaningless alone.
    line = lines[stmt.lineno - 1]
    text = line.strip()
    if len(text) < MIN_LINE_CHARS or ';' in text or text.startswith('#'):
      continue
    if stmt.col_offset != len(line) - len(line.lstrip()):
      continue  # Not the first statement on its line.
    out.append(Candidate(fn.path, fn.qualname, stmt.lineno - 1,
                         line[:len(line) - len(line.lstrip())], text))
  return out


def held_out_functions(eval_fraction: float) -> list[functions_task.Function]:
  """Functions of eval-split files whose text no training-split file contains."""
  fns = functions_task.stdlib_functions()
  train_texts = {f.text.strip() for f in fns
                 if not sources.path_in_eval(f.path, eval_fraction)}
  return [f for f in fns if sources.path_in_eval(f.path, eval_fraction)
          and f.text.strip() not in train_texts]


@dataclasses.dataclass(frozen=True)
class StdlibTask:
  examples: tuple[MCExample, ...]
  # Per example: (file of the context and true line, files of the distractors).
  provenance: tuple[tuple[str, tuple[str, ...]], ...]
  info: dict[str, Any]


@functools.lru_cache(maxsize=4)
def build(eval_fraction: float = 0.05, num_choices: int = 4, per_function: int = 2,
          max_examples: int = 0) -> StdlibTask:
  """The task's examples (all of them when ``max_examples`` is 0), in a fixed order."""
  fns = held_out_functions(eval_fraction)
  by_fn = {(f.path, f.qualname, f.text): f for f in fns}
  picked: list[tuple[Candidate, functions_task.Function]] = []
  pool: dict[str, list[Candidate]] = {}
  seen: set[tuple[str, str]] = set()
  for f in by_fn.values():
    cands = [c for c in candidate_lines(f) if (c.path, c.text) not in seen]
    for c in cands:
      pool.setdefault(c.indent, []).append(c)
    cands.sort(key=lambda c: _h(c.path, c.qualname, c.line_index, c.text))
    for c in (cands[:per_function] if per_function else cands):
      if (c.path, c.text) in seen:
        continue
      seen.add((c.path, c.text))
      picked.append((c, f))
  picked.sort(key=lambda cf: _h('order', cf[0].path, cf[0].qualname, cf[0].line_index))
  for cands in pool.values():
    cands.sort(key=lambda d: (len(d.text), _h(d.path, d.text)))
  lengths = {indent: [len(d.text) for d in cands] for indent, cands in pool.items()}
  examples, provenance = [], []
  for c, f in picked:
    # Distractors of about the true line's length (within LENGTH_TOLERANCE), drawn by a
    # generator seeded from the example: neither score can win on length alone.
    slack = max(3, int(LENGTH_TOLERANCE * len(c.text)))
    lo = bisect.bisect_left(lengths[c.indent], len(c.text) - slack)
    hi = bisect.bisect_right(lengths[c.indent], len(c.text) + slack)
    window = pool[c.indent][lo:hi]
    rng = random.Random(int(_h('distractors', c.path, c.qualname, c.line_index), 16))
    distractors: list[Candidate] = []
    texts = {c.text}
    for _ in range(min(len(window), 64)):
      d = window[rng.randrange(len(window))]
      if d.path == c.path or d.text in texts or d.text in f.text:
        continue
      distractors.append(d)
      texts.add(d.text)
      if len(distractors) == num_choices - 1:
        break
    if len(distractors) < num_choices - 1:
      continue  # A rare indentation or length: too few lines elsewhere.
    label = int(_h('label', c.path, c.qualname, c.line_index), 16) % num_choices
    choices = [c.indent + d.text + '\n' for d in distractors]
    choices.insert(label, c.indent + c.text + '\n')
    context = '\n'.join(f.text.splitlines()[:c.line_index]) + '\n'
    examples.append(MCExample(context, tuple(choices), label, '',
                              f'{c.path}:{c.qualname}:{c.line_index + 1}'))
    provenance.append((c.path, tuple(d.path for d in distractors)))
    if max_examples and len(examples) == max_examples:
      break
  files = sorted({p for p, ds in provenance for p in (p, *ds)})
  info = {'task': NAME, 'examples': len(examples), 'num_choices': num_choices,
          'chance': 1.0 / num_choices, 'eval_fraction': eval_fraction,
          'files': len(files), 'functions': len({e.id.rsplit(':', 1)[0] for e in examples}),
          'python_version': platform.python_version(),
          'fingerprint': _h(*(e.context + '\x01'.join(e.choices) + str(e.label)
                              for e in examples))[:16]}
  return StdlibTask(tuple(examples), tuple(provenance), info)
