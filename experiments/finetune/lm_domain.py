r"""Continued LM pretraining on a new domain: from the stdlib model to Flax's source code.

The pretrained tiny LM (standard library) continues next-token training on another
corpus that every machine with this project has: the installed ``flax`` package's
``*.py`` files (any glob works: ``--config.data.path='~/notes/**/*.md'``).

  python -m launch.train --config=experiments/finetune/lm_domain.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/lm_domain [--config.finetune.mode=lora]

Compare with ``--config.finetune.init_from=`` (from scratch) at the same steps.
Args: ``pretrained=DIR``, ``smoke=True``.
"""

import importlib.util
import os

from experiments.common import apply_smoke
from experiments.finetune import stdlib_modules
from research.config import parse_arg


def flax_source_glob() -> str:
  spec = importlib.util.find_spec('flax')
  root = list(spec.submodule_search_locations)[0] if spec else '.'
  return os.path.join(root, '**', '*.py')


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  c = stdlib_modules.get_config(f'pretrained={a.pretrained}')
  c.name = 'finetune_lm_domain'
  c.task = 'lm'
  c.data.source = 'text_files'
  c.data.path = flax_source_glob()
  c.data.eval_fraction = 0.05
  c.seq_len = 128
  c.steps = 300
  c.eval_steps = 8
  c.num_samples = 1
  c.sample_prompt = 'class Linear(nnx.Module):\n'
  if a.smoke:
    apply_smoke(c)
    c.num_samples = 0
    c.finetune.pretrain_config = 'experiments/pretrain/tiny.py:smoke=True'
  return c


def sweep(arg: str | None = None) -> list[dict]:
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  return [{'finetune.init_from': i, 'finetune.mode': m}
          for i in ('', a.pretrained) for m in ('full', 'lora')]
