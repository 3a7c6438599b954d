"""The offline fine-tuning data: Python functions of the standard library, by module.

Every ``def`` / ``async def`` (methods and nested functions included) of the built-in
corpus (research/data/sources.py: the stdlib's ``*.py`` files, tests excluded) is
extracted with :mod:`ast`, its source dedented. Two datasets are made from them:

* **classification** (:func:`classification_data`): which top-level stdlib module
  (``asyncio``, ``email``, ``tkinter``...) a function comes from. Classes are the
  ``max_classes`` modules with the most functions among those that have enough
  functions in both splits; ids follow the sorted module names.
* **SFT pairs** (:func:`sft_pairs`): prompt = a documented function's signature and
  docstring, response = its body.

Split (deterministic, identical on every machine with the same Python): a function is
in eval when its *file* is held out by the same path hash as the LM corpus split
(``sources.path_in_eval(path, data.eval_fraction)``). So an LM pretraining run with the
same ``data.eval_fraction`` never trained on the file of an eval function. Duplicates
are removed: a text found under two modules is dropped, and a text found in both
splits is kept in eval only, so no function is in both splits. Per-class caps (taken
in a fixed hash order) keep the classes balanced.

Extraction parses ~700 files (a few seconds); the result is cached in memory and on
disk under ``~/.cache/research/`` keyed by the Python version and the file list.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import platform
import tempfile
import textwrap
from typing import Any

from research.data import sources

MIN_CHARS = 40  # Shorter functions (one-line stubs) are skipped.
MIN_TRAIN_PER_CLASS = 40
MIN_EVAL_PER_CLASS = 10
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Function:
  path: str  # Relative to the stdlib root.
  qualname: str  # Class.method, outer.inner ...
  text: str  # Dedented source, from the `def` line to the end of the body.

  @property
  def module(self) -> str:
    """The top-level stdlib module or package (``email/mime/text.py`` -> ``email``)."""
    return self.path.split('/')[0].removesuffix('.py')


def extract_functions(source: str, path: str = '<string>') -> list[Function]:
  """All function definitions of ``source`` (decorators excluded), in source order."""
  tree = ast.parse(source)
  lines = source.splitlines()
  out = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        name = f'{prefix}{child.name}'
        text = textwrap.dedent('\n'.join(lines[child.lineno - 1:child.end_lineno]))
        out.append(Function(path, name, text))
        visit(child, f'{name}.')
      elif isinstance(child, ast.ClassDef):
        visit(child, f'{prefix}{child.name}.')
      else:
        visit(child, prefix)

  visit(tree, '')
  return out


def _cache_path(fingerprint: str) -> str:
  root = os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache'))
  return os.path.join(root, 'research', f'stdlib_functions_v{_CACHE_VERSION}_'
                      f'{platform.python_version()}_{fingerprint[:16]}.json')


@functools.lru_cache(maxsize=2)
def stdlib_functions() -> tuple[Function, ...]:
  """Every function of the built-in corpus, sorted by (path, position)."""
  data_cfg = _stdlib_data_cfg(0.05)
  corpus = sources.file_corpus(data_cfg)
  cache = _cache_path(corpus.fingerprint)
  try:
    with open(cache) as f:
      return tuple(Function(*row) for row in json.load(f))
  except (OSError, ValueError, TypeError):
    pass
  funcs: list[Function] = []
  for rel in corpus.rel_paths:
    try:
      with open(os.path.join(corpus.root, rel), encoding='utf-8') as f:
        funcs.extend(extract_functions(f.read(), rel))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # A file this Python cannot parse (e.g. lib2to3 test data): skip it.
  try:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
      json.dump([dataclasses.astuple(fn) for fn in funcs], f)
    os.replace(tmp, cache)
  except OSError:
    pass
  return tuple(funcs)


def _stdlib_data_cfg(eval_fraction: float):
  import ml_collections
  return ml_collections.ConfigDict({'source': 'stdlib', 'path': '', 'eval_fraction':
                                    float(eval_fraction)})


def _order(text: str) -> str:
  return hashlib.sha1(text.encode('utf-8')).hexdigest()


def _split_unique(eval_fraction: float, min_chars: int = MIN_CHARS
                  ) -> tuple[dict[str, list[Function]], dict[str, list[Function]]]:
  """{module: functions} for train and eval, deduplicated as the module doc says."""
  by_text: dict[str, list[Function]] = {}
  for fn in stdlib_functions():
    if len(fn.text.strip()) >= min_chars:
      by_text.setdefault(fn.text.strip(), []).append(fn)
  train: dict[str, list[Function]] = {}
  evals: dict[str, list[Function]] = {}
  for text, fns in by_text.items():
    if len({fn.module for fn in fns}) > 1:
      continue  # The same code in two modules: its label is ambiguous.
    in_eval = [fn for fn in fns if sources.path_in_eval(fn.path, eval_fraction)]
    fn = in_eval[0] if in_eval else fns[0]
    (evals if in_eval else train).setdefault(fn.module, []).append(fn)
  for d in (train, evals):
    for fns in d.values():
      fns.sort(key=lambda f: _order(f.text))
  return train, evals


@dataclasses.dataclass(frozen=True)
class ClassificationData:
  classes: tuple[str, ...]
  train: tuple[tuple[str, int], ...]  # (text, label), in a fixed shuffled order.
  eval: tuple[tuple[str, int], ...]
  info: dict[str, Any]


@functools.lru_cache(maxsize=8)
def classification_data(eval_fraction: float = 0.2, max_classes: int = 12,
                        max_train_per_class: int = 400, max_eval_per_class: int = 100
                        ) -> ClassificationData:
  """The module-classification dataset (see the module docstring)."""
  train, evals = _split_unique(eval_fraction)
  eligible = [m for m in train if len(train[m]) >= MIN_TRAIN_PER_CLASS
              and len(evals.get(m, ())) >= MIN_EVAL_PER_CLASS]
  eligible.sort(key=lambda m: (-(len(train[m]) + len(evals[m])), m))
  classes = tuple(sorted(eligible[:max_classes]))
  if len(classes) < 2:
    raise ValueError(f'only {len(classes)} stdlib modules have functions in both splits '
                     f'with data.eval_fraction={eval_fraction}; raise it.')
  tr, ev = [], []
  for label, m in enumerate(classes):
    tr += [(fn.text, label) for fn in train[m][:max_train_per_class]]
    ev += [(fn.text, label) for fn in evals[m][:max_eval_per_class]]
  tr.sort(key=lambda x: _order(x[0]))
  ev.sort(key=lambda x: _order(x[0]))
  info = {'classes': list(classes), 'train_examples': len(tr), 'eval_examples': len(ev),
          'train_per_class': {m: min(len(train[m]), max_train_per_class) for m in classes},
          'eval_per_class': {m: min(len(evals[m]), max_eval_per_class) for m in classes},
          'eval_fraction': eval_fraction, 'python_version': platform.python_version()}
  return ClassificationData(classes, tuple(tr), tuple(ev), info)


def split_docstring(fn_text: str) -> tuple[str, str] | None:
  """(signature + docstring, body) of a function with a docstring and a body, else None."""
  try:
    node = ast.parse(fn_text).body[0]
  except (SyntaxError, IndexError):
    return None
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
    return None
  first = node.body[0]
  if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
    return None
  lines = fn_text.splitlines(keepends=True)
  cut = sum(len(line) for line in lines[:first.end_lineno])
  prompt, response = fn_text[:cut], fn_text[cut:]
  if not response.strip():
    return None
  return prompt, response


@functools.lru_cache(maxsize=4)
def sft_pairs(eval_fraction: float = 0.2) -> dict[str, tuple[tuple[str, str], ...]]:
  """{'train': ((prompt, response), ...), 'eval': ...}: docstring -> body."""
  train, evals = _split_unique(eval_fraction)
  out = {}
  for split, d in (('train', train), ('eval', evals)):
    pairs = []
    for fns in d.values():
      for fn in fns:
        pair = split_docstring(fn.text)
        if pair is not None:
          pairs.append(pair)
    pairs.sort(key=lambda p: _order(p[0] + p[1]))
    out[split] = tuple(pairs)
  return out
