"""Multiple-choice scoring by log-likelihood, the lm-evaluation-harness method.

For an example with context ``c`` and choices ``x_1..x_n`` (each continued after the
task's delimiter, ``" "`` for HellaSwag/ARC/PIQA), the model scores each choice by

  ll_j = sum_t log p(token_t of (delimiter + x_j) | c, earlier continuation tokens)

and predicts ``argmax_j ll_j`` (**acc**) or ``argmax_j ll_j / len(x_j)`` (**acc_norm**:
the harness divides by the choice's length in characters, not tokens, so the metric does
not depend on how a vocabulary splits the choice; ``acc_bytes`` divides by its UTF-8
length, equal to ``acc_norm`` for ASCII).

Encoding follows the harness's ``_encode_pair``: trailing whitespace of the context
moves to the front of the continuation, ``whole = encode(context + continuation)``,
``context_ids = encode(context)``, continuation ids = ``whole[len(context_ids):]`` (so a
BPE merge across the boundary is scored as the model would see it). An empty context is
replaced by the EOS id (our byte model starts documents after EOS). A sequence longer
than ``max_len + 1`` tokens keeps its last ``max_len + 1`` (left truncation).

Batches are sorted by length, padded on the right to a bucket (a multiple of 32) and a
fixed row count, so one jitted function compiles once per bucket; padding never changes
a score (causal attention; masked targets).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BUCKET = 32


@dataclasses.dataclass(frozen=True)
class MCExample:
  """One multiple-choice question: ``context`` + ``delimiter`` + ``choices[label]``."""
  context: str
  choices: tuple[str, ...]
  label: int
  delimiter: str = ' '
  id: str = ''


def encode_pair(tokenizer: Any, context: str, continuation: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """(context ids, continuation ids) as lm-evaluation-harness encodes them."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces > 0:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
  ctx = np.asarray(tokenizer.encode(context), np.int32)
  cont = whole[len(ctx):]
  if len(ctx) == 0:
    prefix = getattr(tokenizer, 'eos_id', None)
    if prefix is None:
      prefix = getattr(tokenizer, 'bos_id', 0)
    ctx = np.asarray([prefix], np.int32)
  return ctx, cont


def _rows(ctx: np.ndarray, cont: np.ndarray, max_len: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, mask) of one request, left-truncated to ``max_len`` inputs."""
  seq = np.concatenate([ctx, cont])[-(max_len + 1):]
  inputs, targets = seq[:-1], seq[1:]
  mask = np.zeros(len(targets), np.float32)
  mask[max(len(targets) - len(cont), 0):] = 1.0
  return inputs, targets, mask


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _loglik(graphdef, state, inputs_BL, targets_BL, mask_BL):
  """Per row: (sum of masked target log-probs, whether every masked target is argmax)."""
  model = nnx.merge(graphdef, state)
  logits_BLV = model(inputs_BL).astype(jnp.float32)
  logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
  tok_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  ll_B = jnp.sum(tok_BL * mask_BL, axis=-1)
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL) | (mask_BL == 0)
  return ll_B, jnp.all(hit_BL, axis=-1)


def loglikelihoods(model: nnx.Module, tokenizer: Any,
                   requests: Sequence[tuple[str, str]], *, max_len: int,
                   batch_size: int = 32, pad_id: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(log-likelihood, is_greedy) of each ``(context, continuation)`` request."""
  if max_len < 2:
    raise ValueError(f'max_len must be >= 2, got {max_len}.')
  rows = [_rows(*encode_pair(tokenizer, c, x), max_len) for c, x in requests]
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  lls = np.zeros(len(rows), np.float64)
  greedy = np.zeros(len(rows), bool)
  graphdef, state = nnx.split(model)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    longest = max(len(rows[i][0]) for i in idx)
    L = min(-(-longest // BUCKET) * BUCKET, max_len)  # longest <= max_len.
    inputs = np.full((batch_size, L), pad_id, np.int32)
    targets = np.full((batch_size, L), pad_id, np.int32)
    mask = np.zeros((batch_size, L), np.float32)
    for r, i in enumerate(idx):
      x, y, m = rows[i]
      inputs[r, :len(x)], targets[r, :len(y)], mask[r, :len(m)] = x, y, m
    ll, g = jax.device_get(_loglik(graphdef, state, jnp.asarray(inputs),
                                   jnp.asarray(targets), jnp.asarray(mask)))
    lls[idx] = ll[:len(idx)]
    greedy[idx] = g[:len(idx)]
  return lls, greedy


@dataclasses.dataclass
class MCResult:
  """Per-example scores and predictions of a multiple-choice run."""
  lls: list[np.ndarray]  # [num_choices] per example.
  acc: np.ndarray  # 0/1 per example.
  acc_norm: np.ndarray
  acc_bytes: np.ndarray


def predictions(lls: np.ndarray, choices: Sequence[str]) -> tuple[int, int, int]:
  """(argmax ll, argmax ll/len chars, argmax ll/len UTF-8 bytes); ties: first choice."""
  chars = np.asarray([max(len(c), 1) for c in choices], np.float64)
  nbytes = np.asarray([max(len(c.encode('utf-8')), 1) for c in choices], np.float64)
  return int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))


def score(model: nnx.Module, tokenizer: Any, examples: Sequence[MCExample], *,
          max_len: int, batch_size: int = 32) -> MCResult:
  """Scores every choice of every example in one batched pass (see module doc)."""
  requests, owner = [], []
  for i, ex in enumerate(examples):
    for choice in ex.choices:
      requests.append((ex.context, ex.delimiter + choice))
      owner.append(i)
  lls, _ = loglikelihoods(model, tokenizer, requests, max_len=max_len,
                          batch_size=batch_size, pad_id=int(getattr(tokenizer, 'pad_id', 0)))
  per_example: list[list[float]] = [[] for _ in examples]
  for i, ll in zip(owner, lls):
    per_example[i].append(ll)
  out = MCResult([], np.zeros(len(examples)), np.zeros(len(examples)),
                 np.zeros(len(examples)))
  for i, ex in enumerate(examples):
    ll = np.asarray(per_example[i])
    out.lls.append(ll)
    p, pn, pb = predictions(ll, ex.choices)
    out.acc[i], out.acc_norm[i], out.acc_bytes[i] = p == ex.label, pn == ex.label, pb == ex.label
  return out
