"""Test-only fine-tuning sweep (tests/test_finetune.py): the stdlib-modules experiment at
smoke size, linear probe from scratch vs from the pretrained checkpoint, 2 steps each."""

from experiments.finetune import stdlib_modules
from research.config import parse_arg


def get_config(arg: str | None = None):
  c = stdlib_modules.get_config(arg)
  c.steps = 2
  c.eval_every = 2
  c.checkpoint_every = 2
  c.eval_steps = 1
  c.finetune.max_train_per_class = 10
  c.finetune.max_eval_per_class = 2
  return c


def sweep(arg: str | None = None) -> list[dict]:
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  return [{'finetune.init_from': init, 'finetune.mode': 'linear_probe'}
          for init in ('', a.pretrained)]
