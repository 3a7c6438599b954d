r"""GLUE SST-2 sentiment classification (TFDS ``glue/sst2``; needs the network once).

Prepare the data on a machine with the network (array_record, no TensorFlow needed):

  tfds build glue/sst2 --file_format=array_record

Fine-tune our pretrained tiny LM (pretrained first into the path if needed), or an
imported Hugging Face model (``pretrained=/path/to/hf_dir``: config.json +
model.safetensors (+ tokenizer.json, then used instead of bytes)):

  python -m launch.train --config=experiments/finetune/sst2.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/sst2 [--config.finetune.mode=lora]

Eval: accuracy, macro-F1 and the per-class report on the validation split (872).
Args: ``pretrained=DIR``, ``smoke=True``.
"""

from experiments.common import apply_smoke
from experiments.finetune import stdlib_modules
from research.config import parse_arg


def register_glue() -> None:
  """tfds 4.9 registers the legacy glue builder only once its module is imported."""
  try:
    import tensorflow_datasets.text.glue  # noqa: F401
  except ImportError:
    pass


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, pretrained=stdlib_modules.DEFAULT_PRETRAINED)
  register_glue()
  c = stdlib_modules.get_config(f'pretrained={a.pretrained}')
  c.name = 'finetune_sst2'
  c.data.source = 'tfds'
  c.data.name = 'glue/sst2'
  c.data.text_key = 'sentence'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.finetune.label_key = 'label'
  c.finetune.pretrain_overrides = ()
  c.seq_len = 256
  c.steps = 2000
  c.eval_every = 500
  c.eval_steps = 28  # 872 validation sentences at batch 32.
  c.checkpoint_every = 500
  if a.smoke:
    apply_smoke(c)
    c.seq_len, c.eval_steps, c.num_samples = 64, 2, 0
    c.finetune.pretrain_config = 'experiments/pretrain/tiny.py:smoke=True'
  return c


def sweep(arg: str | None = None) -> list[dict]:
  return [{'finetune.mode': m} for m in ('full', 'lora', 'linear_probe')]
