"""Test-only sweep (tests/test_sweep.py): the tiny experiment at smoke size, 4 settings.

  python -m launch.sweep --config=tests/sweep_config.py --workdir=/tmp/s --parallel=2

``bad=True`` adds a fifth entry the trainer rejects (num_kv_heads=3 does not divide
num_heads=4), to check that a failed run is reported and the others finish.
"""

from experiments.pretrain import tiny
from research.config import parse_arg


def get_config(arg: str | None = None):
  parse_arg(arg, bad=False)
  c = tiny.get_config('smoke=True')
  c.steps = 4
  c.eval_every = 2
  c.log_every = 2
  c.checkpoint_every = 2
  c.num_samples = 0
  return c


def sweep(arg: str | None = None) -> list[dict]:
  a = parse_arg(arg, bad=False)
  out = [{'model.d_model': d, 'optimizer.learning_rate': lr}
         for d in (16, 32) for lr in (3e-3, 1e-2)]
  if a.bad:
    out.append({'model.num_kv_heads': 3})
  return out
