r"""Small (~10M parameters) byte-level decoder LM on the built-in corpus.

  python -m launch.train --config=experiments/pretrain/small.py --workdir=/tmp/small

Goes well below the tiny config's loss. On a CPU the run resolves its execution
choices by backend (research/backend_defaults.py: the projections' transpose_input
backward, the layer scan unrolled, 8 micro-batches of 4 sequences): the same update,
README "Benchmarking" has the measured step time.
Args: ``smoke=True``.
"""

from experiments.common import apply_smoke
from research.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False)
  c = base_config()
  c.name = 'small'
  c.steps = 1200
  c.batch_size = 32
  c.seq_len = 256
  c.log_every = 50
  c.eval_every = 300
  c.eval_steps = 16
  c.checkpoint_every = 300
  c.model.d_model = 384
  c.model.num_layers = 6
  c.model.num_heads = 6
  c.model.mlp_dim = 1024
  c.model.max_seq_len = 1024
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  if a.smoke:
    apply_smoke(c)
  return c


def sweep() -> list[dict]:
  return [{'optimizer.learning_rate': lr} for lr in (1e-3, 2e-3, 4e-3)]
