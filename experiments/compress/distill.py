r"""Knowledge distillation: student size x distillation weight, one pretrained teacher.

  python -m launch.sweep --config=experiments/compress/distill.py --workdir=/tmp/distill

The teacher is the ``tiny`` pretraining config (d_model 128, 2 layers, byte tokenizer,
stdlib corpus), trained once into ``DIR/teacher`` by the first student that needs it
(``distill.teacher_config``; file-locked) and reused; students are d_model 64 / 96
(2 layers) trained ``steps`` steps with alpha in {0 (= from scratch), 0.5, 0.9}, T=2.
Expected (Hinton et al. 2015): at equal steps the distilled students reach a lower eval
loss than the same student from scratch, the gap shrinking as the student grows.

Args: ``smoke=True`` (seconds-long CPU test), ``teacher=PATH`` (default ``teacher``:
relative to the sweep directory), ``steps=400``, ``teacher_steps=400``.
"""

from experiments.common import apply_smoke
from experiments.pretrain import tiny
from research.config import parse_arg

_ARGS = dict(smoke=False, teacher='teacher', steps=400, teacher_steps=400)


def get_config(arg: str | None = None):
  a = parse_arg(arg, **_ARGS)
  c = tiny.get_config()
  c.name = 'distill'
  c.steps = a.steps
  c.eval_every = c.checkpoint_every = c.steps
  c.eval_steps = 16
  c.num_samples = 0
  c.model.d_model = 64
  c.model.mlp_dim = 192
  c.distill.teacher = a.teacher
  smoke = ',smoke=True' if a.smoke else ''
  c.distill.teacher_config = (f'experiments/compress/distill_teacher.py:'
                              f'teacher_steps={a.teacher_steps}{smoke}')
  c.distill.alpha = 0.5
  c.distill.temperature = 2.0
  if a.smoke:
    apply_smoke(c)
    c.num_samples = 0
    c.model.d_model = 16
    c.model.mlp_dim = 32
    c.eval_every = c.checkpoint_every = c.steps
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """Student width x alpha (alpha 0: the student from scratch, no teacher)."""
  a = parse_arg(arg, **_ARGS)
  widths = (16, 24) if a.smoke else (64, 96)
  return [{'model.d_model': d, 'model.mlp_dim': 3 * d, 'distill.alpha': alpha}
          for d in widths for alpha in (0.0, 0.5, 0.9)]
