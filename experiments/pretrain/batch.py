r"""Batch-strategy ablation at equal tokens: fixed batch, gradient accumulation, smaller
batch, and a GPT-3-style batch-size ramp with each LR scaling rule.

  python -m launch.sweep --config=experiments/pretrain/batch.py \
      --workdir=/tmp/batch --parallel=1

The model and data are those of experiments/pretrain/schedules.py (d_model 128, 2
layers, byte-level, built-in corpus), cosine schedule, peak LR 3e-3 declared for the
final batch of 32 x 128 tokens. Every run sees the same 819,200 tokens:

* ``batch_size=32, steps=200``: the reference.
* ``... grad_accum_steps=4``: 4 micro-batches of 8; should equal the reference up to
  float32 rounding (tests/test_batch.py checks the single update exactly).
* ``batch_size=16, steps=400``: twice the updates at half the batch, same LR (and
  ``eval_steps=32``, so that every run is evaluated on the same validation tokens).
* ramp 8 -> 16 -> 32 (after steps 40 and 80; 250 steps) with ``lr_scaling`` none,
  linear and sqrt (LR x (b/32)^{0, 1, 1/2} while the batch is small).

Measured results: README ("Optimizers, schedules and batch strategies").
Args: ``smoke=True`` (seconds-long runs for tests).
"""

from experiments.pretrain import schedules
from research.batch_ramp import BatchRamp
from research.config import parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False)
  c = schedules.get_config('smoke=True' if a.smoke else None)
  c.name = 'batch'
  if not a.smoke:
    c.batch_size = 32
    c.steps = 200
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 10
    c.optimizer.warmup_steps = 20
  c.optimizer.schedule = 'cosine'
  c.optimizer.learning_rate = 3e-3
  return c


def equal_token_steps(steps: int, batch: int, boundaries, sizes) -> int:
  """Steps of a ramp run that sees ``steps * batch`` sequences (rounded up)."""
  ramped = BatchRamp(tuple(boundaries), tuple(sizes) + (batch,))
  early = ramped.tokens_through(boundaries[-1], 1)
  return boundaries[-1] + -(-(steps * batch - early) // batch)


def sweep(arg: str | None = None) -> list[dict]:
  c = get_config(arg)
  s, b = c.steps, c.batch_size
  bounds = (s // 5, 2 * s // 5)
  sizes = (b // 4, b // 2)
  ramp_steps = equal_token_steps(s, b, bounds, sizes)
  runs = [
      {'batch_size': b, 'steps': s},
      {'batch_size': b, 'steps': s, 'optimizer.grad_accum_steps': 4},
      # Twice the eval batches: every run evaluates on the same validation tokens.
      {'batch_size': b // 2, 'steps': 2 * s, 'eval_steps': 2 * c.eval_steps},
  ]
  for scaling in ('none', 'linear', 'sqrt'):
    runs.append({'batch_size': b, 'steps': ramp_steps, 'batch_ramp.boundaries': bounds,
                 'batch_ramp.batch_sizes': sizes, 'batch_ramp.lr_scaling': scaling})
  return runs
