r"""The distillation teacher (``distill.teacher_config`` of experiments/compress/distill.py).

  python -m launch.train --config=experiments/compress/distill_teacher.py --workdir=/tmp/teacher

The ``tiny`` float LM (d_model 128, 2 layers); ``smoke=True`` shrinks it.
Args: ``smoke=True``, ``teacher_steps=400``.
"""

from experiments.pretrain import tiny
from research.config import parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, teacher_steps=400)
  c = tiny.get_config('smoke=True' if a.smoke else None)
  c.name = 'teacher'
  c.steps = 6 if a.smoke else a.teacher_steps
  c.num_samples = 0
  c.eval_every = c.checkpoint_every = c.steps  # One evaluation and checkpoint, at the end.
  c.eval_steps = 2 if a.smoke else 16
  return c


def sweep(arg: str | None = None) -> list[dict]:
  return [{}]
