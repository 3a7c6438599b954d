r"""Learning-rate schedule ablation: schedule x peak LR at equal tokens (CPU-sized).

  python -m launch.sweep --config=experiments/pretrain/schedules.py \
      --workdir=/tmp/schedules --parallel=1
  python -m launch.plot_schedule --config=experiments/pretrain/schedules.py \
      --compare=cosine,wsd,linear,constant,inverse_sqrt --out=/tmp/schedules/lr.png

A byte-level decoder (d_model 128, 2 layers, ~0.4M parameters) on the built-in corpus,
400 steps of 16 x 128 tokens (819k tokens) per run, 40 warmup steps; 16 runs (5
schedules x 3 peak LRs, plus a cosine-to-0 control) of 48-75 s each, 15 minutes in all
on 2 idle CPU cores. Following Hägele et al. 2024 ("Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations"), cosine decays to 10% of
the peak and WSD holds the peak, then cools down over the last 20% of the steps with
the (1 - sqrt) shape to 0; linear decays to 10%. Their finding to reproduce: WSD
matches or beats cosine at equal tokens. Measured results: README ("Optimizers,
schedules and batch strategies").
Args: ``smoke=True`` (seconds-long runs for tests).
"""

from experiments.common import apply_smoke
from research.config import base_config, parse_arg

SCHEDULES = ('cosine', 'wsd', 'linear', 'constant', 'inverse_sqrt')
PEAK_LRS = (1e-3, 3e-3, 1e-2)


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False)
  c = base_config()
  c.name = 'schedules'
  c.steps = 400
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 20
  c.eval_every = 200
  c.eval_steps = 16
  c.checkpoint_every = 200
  c.num_samples = 0
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 384
  c.model.max_seq_len = 512
  o = c.optimizer
  o.learning_rate = 3e-3
  o.schedule = 'cosine'
  o.warmup_steps = 40
  o.min_lr_ratio = 0.1  # Cosine and linear end at 10% of the peak.
  o.wsd_decay_fraction = 0.2
  o.wsd_decay_shape = 'sqrt'  # (1 - sqrt): the cooldown Hägele et al. find best.
  if a.smoke:
    apply_smoke(c)
    c.num_samples = 0
  return c


def sweep() -> list[dict]:
  """Every schedule at every peak LR; WSD cools down to 0 (min_lr_ratio=0).

  The last run is a control: cosine to 0 at the middle LR, which separates "WSD's
  shape" from "WSD ends at 0 while cosine ends at 10%".
  """
  runs = []
  for schedule in SCHEDULES:
    for lr in PEAK_LRS:
      entry = {'optimizer.schedule': schedule, 'optimizer.learning_rate': lr}
      if schedule == 'wsd':
        entry['optimizer.min_lr_ratio'] = 0.0
      runs.append(entry)
  runs.append({'optimizer.schedule': 'cosine', 'optimizer.learning_rate': PEAK_LRS[1],
               'optimizer.min_lr_ratio': 0.0})
  return runs
