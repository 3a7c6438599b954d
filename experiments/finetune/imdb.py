r"""IMDB movie-review sentiment (TFDS ``imdb_reviews``; needs the network once).

  tfds build imdb_reviews --file_format=array_record
  python -m launch.train --config=experiments/finetune/imdb.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/imdb [--config.finetune.mode=lora]

Reviews are long: the first ``seq_len`` (512) bytes are classified, mean-pooled. Eval
reads the first ``eval_steps * batch_size`` (2,048) reviews of the test split, a fixed
sample (TFDS writes examples in hashed-key order); raise eval_steps for all 25,000.
Args: ``pretrained=DIR``, ``smoke=True``.
"""

from experiments.common import apply_smoke
from experiments.finetune import stdlib_modules
from research.config import parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  c = stdlib_modules.get_config(f'pretrained={a.pretrained}')
  c.name = 'finetune_imdb'
  c.data.source = 'tfds'
  c.data.name = 'imdb_reviews'
  c.data.text_key = 'text'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.finetune.label_key = 'label'
  c.finetune.pretrain_overrides = ()
  c.finetune.pooling = 'mean'
  c.seq_len = 512
  c.steps = 2000
  c.eval_every = 500
  c.eval_steps = 64
  c.checkpoint_every = 500
  if a.smoke:
    apply_smoke(c)
    c.seq_len, c.eval_steps, c.num_samples = 64, 2, 0
    c.finetune.pretrain_config = 'experiments/pretrain/tiny.py:smoke=True'
  return c


def sweep(arg: str | None = None) -> list[dict]:
  return [{'finetune.mode': m} for m in ('full', 'lora', 'linear_probe')]
