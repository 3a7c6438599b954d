r"""Tiny byte-level decoder LM on the built-in corpus (the Python standard library).

The default experiment: runs offline on a laptop CPU in under 2 minutes.

  python -m launch.train --config=experiments/pretrain/tiny.py --workdir=/tmp/tiny

Expected (2 CPU cores): eval loss below 2.4 nats/byte (the corpus's byte-unigram
entropy is 3.24, uniform 5.55); see README for the measured figures.
Args: ``smoke=True`` shrinks it to a seconds-long CPU test.
"""

from experiments.common import apply_smoke
from research.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False)
  c = base_config()
  c.name = 'tiny'
  c.steps = 400
  c.batch_size = 32
  c.seq_len = 128
  c.log_every = 50
  c.eval_every = 100
  c.eval_steps = 8
  c.checkpoint_every = 100
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 384
  c.model.max_seq_len = 512
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.1
  if a.smoke:
    apply_smoke(c)
  return c


def sweep() -> list[dict]:
  """Model width ablation (run with launch.sweep)."""
  return [{'model.d_model': d} for d in (64, 128, 256)]
