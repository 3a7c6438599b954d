r"""Small (~10M parameters) byte-level decoder LM on the built-in corpus.

  python -m launch.train --config=experiments/pretrain/small.py --workdir=/tmp/small

About 2 hours on 2 CPU cores (5.8 s per step measured by launch.benchmark); goes
well below the tiny config's loss.
Args: ``smoke=True``; ``cpu=True`` runs the same update faster on a CPU: unscanned
layers, 8 micro-batches of 4 sequences (cache-sized activations) and projections whose
backward transposes the activation, not the gradient (``model.projection_vjp``);
launch.benchmark: 2.1 s instead of 5.8 s per step on 2 cores, README "Benchmarking".
"""

from experiments.common import apply_smoke
from research.config import base_config, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, cpu=False)
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
  if a.cpu and not a.smoke:
    c.model.scan_layers = False
    c.model.projection_vjp = 'transpose_input'
    c.optimizer.grad_accum_steps = 8
  if a.smoke:
    apply_smoke(c)
  return c


def sweep() -> list[dict]:
  return [{'optimizer.learning_rate': lr} for lr in (1e-3, 2e-3, 4e-3)]
