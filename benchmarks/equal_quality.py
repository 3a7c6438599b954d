r"""Equal quality at equal steps: ours and the PyTorch reference trained on the same bytes.

  python -m benchmarks.equal_quality [--config=experiments/pretrain/small.py] \
      [--shape=4x128] [--steps=2000] [--text=FILE] [--eval_every=250] [--out=quality.json]

Both models get the same shape (our config with the GPT-2 block and the ``--shape``
preset, as in the speed harness), the same initial weights (ours are copied into the
reference; ``--torch_init`` gives the reference its own initialisation instead), the
same learning rate at every step (our schedule, evaluated as the trainer does), and
the same byte windows in the same order: a seeded sampler draws ``batch_size``
windows of ``seq_len + 1`` bytes from the first 90% of the text file for each step;
validation is a fixed set of windows from the last 10%. Tokens are our byte
tokenizer's ids (byte + 3). Our side runs the config's own jitted train and eval
steps (research/step.py); the reference runs ``benchmarks/torch_gpt.py``.

The default text is ``pydoc_data/topics.py`` of the running Python (757 KB of English
documentation on CPython 3.11): it ships with every Python, so nothing is fetched.
Prints and writes both validation losses at every evaluation and their relative
difference at the end (the issue's bar: within 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

TOKEN_OFFSET = 3  # research.data.tokenizers.ByteTokenizer: byte b -> id b + 3.


def default_text() -> str:
  import pydoc_data
  return os.path.join(os.path.dirname(pydoc_data.__file__), 'topics.py')


class ByteWindows:
  """Seeded random windows of a byte file; the last ``eval_fraction`` is validation."""

  def __init__(self, path: str, seq_len: int, batch_size: int, *, seed: int = 0,
               eval_fraction: float = 0.1):
    with open(path, 'rb') as f:
      ids = np.frombuffer(f.read(), np.uint8).astype(np.int64) + TOKEN_OFFSET
    cut = int(len(ids) * (1 - eval_fraction))
    self.train, self.val = ids[:cut], ids[cut:]
    if min(len(self.train), len(self.val)) <= seq_len + 1:
      raise ValueError(f'{path} is too short for windows of {seq_len + 1} bytes.')
    self.seq_len, self.batch_size = seq_len, batch_size
    self.rng = np.random.default_rng(seed)
    self.seed = seed

  def _windows(self, data: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.stack([data[s:s + self.seq_len + 1] for s in starts])
    return w[:, :-1], w[:, 1:]

  def next_train(self) -> tuple[np.ndarray, np.ndarray]:
    starts = self.rng.integers(0, len(self.train) - self.seq_len - 1, self.batch_size)
    return self._windows(self.train, starts)

  def eval_batches(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(self.seed + 1)
    return [self._windows(self.val, rng.integers(0, len(self.val) - self.seq_len - 1,
                                                 self.batch_size)) for _ in range(n)]


def build_config(config_spec: str, shape: str, steps: int, overrides: dict[str, Any]):
  from benchmarks.side_by_side import GPT2_BLOCK, SHAPES
  from research import recipe
  from research.config import override
  config = recipe.load_config(config_spec, '--config')
  override(config, {**GPT2_BLOCK, **SHAPES[shape], 'steps': steps, **overrides})
  return config


class Ours:
  """Our config's jitted train/eval steps, fed numpy batches."""

  def __init__(self, config):
    import jax
    import ml_collections
    from flax import nnx
    from research import recipe
    from research import sharding as shd
    from research import step as step_lib
    from research.train_state import create_train_state
    from research import backend_defaults
    self.jax = jax
    config = ml_collections.ConfigDict(config.to_dict())
    self.backend_changes = backend_defaults.apply(config)  # As recipe.run does.
    self.config, task, _ = recipe.compose(config, build_tokenizer=False)
    self.mesh = shd.mesh_from_config(self.config.mesh)
    self.rules = shd.rules_from_config(self.config.mesh)
    self.ts = create_train_state(self.config, self.mesh, task)
    self.sharding = step_lib.batch_sharding(self.mesh, self.config)
    self.train_step = step_lib.make_train_step(self.config, task, self.ts, self.sharding)
    self.eval_step = step_lib.make_eval_step(task, self.ts.graphdef, self.ts.shardings,
                                             self.sharding)
    model, _ = nnx.merge(self.ts.graphdef, self.ts.state)
    self.initial_params = {
        '/'.join(str(k) for k in path): np.asarray(jax.device_get(var[...]))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    self.state = self.ts.state

  def _batch(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    b = {'inputs': x.astype(np.int32), 'targets': y.astype(np.int32),
         'mask': np.ones(x.shape, np.float32)}
    return self.jax.device_put(b, self.sharding)

  def step(self, x: np.ndarray, y: np.ndarray) -> float:
    from research import sharding as shd
    with shd.use_mesh(self.mesh, self.rules):
      self.state, m = self.train_step(self.state, self._batch(x, y))
    return float(m['loss'])

  def evaluate(self, batches) -> float:
    from research import sharding as shd
    total = weight = 0.0
    with shd.use_mesh(self.mesh, self.rules):
      for x, y in batches:
        sums = self.eval_step(self.state, self._batch(x, y))
        total += float(sums['loss'])
        weight += float(sums['weight'])
    return total / weight


class Reference:
  """benchmarks/torch_gpt.py with our per-step learning rates."""

  def __init__(self, spec: dict[str, Any], lrs: np.ndarray, init: dict[str, np.ndarray] | None,
               threads: int):
    import torch
    from benchmarks import torch_gpt
    self.torch, self.tg = torch, torch_gpt
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.model = torch_gpt.GPT(torch_gpt.GPTSpec.from_dict(spec))
    if init is not None:
      torch_gpt.load_research_params(self.model, init)
    self.opt = torch_gpt.make_optimizer(self.model)
    self.lrs = lrs
    self.t = 0

  def step(self, x: np.ndarray, y: np.ndarray) -> float:
    lr = float(self.lrs[self.t])
    self.t += 1
    return self.tg.train_step(self.model, self.opt, self.torch.from_numpy(x),
                              self.torch.from_numpy(y), lr)

  def evaluate(self, batches) -> float:
    return float(np.mean([self.tg.eval_loss(self.model, self.torch.from_numpy(x),
                                            self.torch.from_numpy(y)) for x, y in batches]))


def run_quality(config, *, text: str, eval_every: int, eval_batches: int, same_init: bool = True,
                threads: int = 0, seed: int = 0, log=print) -> dict[str, Any]:
  """Trains both for ``config.steps`` on identical batches; returns the loss curves."""
  from benchmarks.side_by_side import torch_spec
  from research.benchmark import model_config_summary
  from research.optim import run_schedule
  ours = Ours(config)
  cfg = ours.config
  summary = {'model': model_config_summary(cfg), 'seq_len': cfg.seq_len,
             'batch_size': cfg.batch_size}
  spec = torch_spec(summary)
  lrs = run_schedule(cfg)['learning_rate']
  ref = Reference(spec, lrs, ours.initial_params if same_init else None,
                  threads or len(os.sched_getaffinity(0)))
  data = ByteWindows(text, cfg.seq_len, cfg.batch_size, seed=seed)
  val = data.eval_batches(eval_batches)
  rows = [{'step': 0, 'ours_val': ours.evaluate(val), 'torch_val': ref.evaluate(val)}]
  log(json.dumps(rows[-1]))
  train = []
  t0 = time.time()
  for s in range(1, cfg.steps + 1):
    x, y = data.next_train()
    train.append({'step': s, 'ours': ours.step(x, y), 'torch': ref.step(x, y)})
    if s % eval_every == 0 or s == cfg.steps:
      rows.append({'step': s, 'ours_train': train[-1]['ours'],
                   'torch_train': train[-1]['torch'],
                   'ours_val': ours.evaluate(val), 'torch_val': ref.evaluate(val),
                   'elapsed_s': time.time() - t0})
      log(json.dumps(rows[-1]))
  final = rows[-1]
  return {
      'text': text, 'text_bytes': int(len(data.train) + len(data.val)),
      'steps': cfg.steps, 'shape': summary['model'], 'seq_len': cfg.seq_len,
      'batch_size': cfg.batch_size, 'same_init': same_init,
      'backend_defaults': ours.backend_changes,
      'eval_windows': eval_batches * cfg.batch_size,
      'final_ours_val': final['ours_val'], 'final_torch_val': final['torch_val'],
      'relative_difference': (final['ours_val'] - final['torch_val']) / final['torch_val'],
      'evals': rows, 'train': train,
  }


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description='Equal quality at equal steps (see module doc).')
  p.add_argument('--config', default='experiments/pretrain/small.py')
  p.add_argument('--shape', default='4x128')
  p.add_argument('--steps', type=int, default=2000)
  p.add_argument('--text', default='')
  p.add_argument('--eval_every', type=int, default=250)
  p.add_argument('--eval_batches', type=int, default=20)
  p.add_argument('--torch_init', action='store_true',
                 help="The reference's own initialisation (not ours copied).")
  p.add_argument('--threads', type=int, default=0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='Extra config overrides, e.g. --set optimizer.learning_rate=1e-3.')
  p.add_argument('--out', default='quality.json')
  a = p.parse_args(argv)
  import ast
  overrides = {}
  for kv in a.set:
    k, v = kv.split('=', 1)
    try:
      overrides[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      overrides[k] = v
  config = build_config(a.config, a.shape, a.steps, {'seed': a.seed, **overrides})
  report = run_quality(config, text=a.text or default_text(), eval_every=a.eval_every,
                       eval_batches=a.eval_batches, same_init=not a.torch_init,
                       threads=a.threads, seed=a.seed)
  report['command'] = 'python -m benchmarks.equal_quality ' + ' '.join(
      argv if argv is not None else __import__('sys').argv[1:])
  with open(a.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f"step {report['steps']}: validation loss ours {report['final_ours_val']:.4f}  "
        f"torch {report['final_torch_val']:.4f}  "
        f"(ours - torch) / torch = {100 * report['relative_difference']:+.2f}%")


if __name__ == '__main__':
  main()
