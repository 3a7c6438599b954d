r"""Supervised fine-tuning, offline: write a function's body from its signature + docstring.

Pairs from the standard library (research/data/functions_task.py: ~5,000 train, ~1,600
eval, split by file like the classification task); the loss is on the body only.

  python -m launch.train --config=experiments/finetune/sft_docstrings.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/sft [--config.finetune.mode=lora]

Your own pairs: ``--config.data.source=text_files --config.data.path='pairs/*.jsonl'``
(one ``{"prompt": ..., "response": ...}`` per line). Args: ``pretrained=DIR``, ``smoke=True``.
"""

from experiments.common import apply_smoke
from experiments.finetune import stdlib_modules
from research.config import parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  c = stdlib_modules.get_config(f'pretrained={a.pretrained}')
  c.name = 'finetune_sft_docstrings'
  c.task = 'sft'
  c.seq_len = 256
  c.steps = 300
  c.eval_steps = 20
  c.num_samples = 2
  c.sample_prompt = 'def mean(values):\n    """Return the arithmetic mean of values."""\n'
  c.sample_len = 120
  c.sample_temperature = 0.5
  if a.smoke:
    apply_smoke(c)
    c.seq_len, c.num_samples = 64, 0
    c.finetune.pretrain_config = 'experiments/pretrain/tiny.py:smoke=True'
  return c


def sweep(arg: str | None = None) -> list[dict]:
  return [{'finetune.mode': 'full'}, {'finetune.mode': 'lora', 'finetune.lora_rank': 16}]
