r"""Quantization ablation: QAT from scratch, QAT fine-tuning and PTQ on a small float LM.

The one command (float pretraining if missing, then every QAT/PTQ run, integer export,
tables; about 15-20 minutes on 2 CPU cores; a rerun skips finished runs):

  python -m launch.quantize --ablation --config=experiments/qat/ablation.py --workdir=/tmp/qat

writes /tmp/qat/quant_results.md (loss and perplexity gap vs the float reference, model
bytes) and /tmp/qat/results.md (the generic sweep table).

The float model is the ``tiny`` pretraining config (d_model 128, 2 layers, 0.47M
parameters, byte tokenizer on the stdlib corpus) trained ``pretrain_steps`` (600)
steps. QAT fine-tuning and its float reference ("float-ft": the same continued
training without quantization) run ``ft_steps`` (150) more steps at a lower learning
rate from that checkpoint; QAT from scratch trains ``pretrain_steps`` steps. Expected
(AQT; LLM-QAT, Liu et al. 2023): int8 W+A QAT within ~1% of the float loss; 4-bit
weight-only QAT clearly better than 4-bit PTQ; 2 bits degrades most.

Args: ``smoke=True`` (seconds-long CPU test), ``pretrain_steps=600``, ``ft_steps=150``.
"""

from experiments.common import apply_smoke
from experiments.pretrain import tiny
from research.config import parse_arg

_ARGS = dict(smoke=False, pretrain_steps=600, ft_steps=150)


def get_config(arg: str | None = None):
  a = parse_arg(arg, **_ARGS)
  c = tiny.get_config()
  c.name = 'qat_ablation'
  c.steps = a.pretrain_steps
  c.eval_every = c.steps  # One evaluation at the end (more batches: less noise).
  c.eval_steps = 16
  c.checkpoint_every = c.steps
  c.keep_checkpoints = 1
  c.num_samples = 0
  c.log_every = 100
  if a.smoke:
    apply_smoke(c)
    c.num_samples = 0
    c.quant.group_size = 8  # Divides the smoke model's head_dim (8) and widths.
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """Float baseline, float-ft reference, QAT fine-tuning, QAT from scratch, PTQ."""
  a = parse_arg(arg, **_ARGS)
  ft_steps = 3 if a.smoke else a.ft_steps
  base = get_config(arg)
  ft = {'quant.init_from': 'name=float', 'steps': ft_steps,
        'optimizer.learning_rate': base.optimizer.learning_rate / 3,
        'optimizer.warmup_steps': max(1, ft_steps // 10),
        'eval_every': ft_steps, 'checkpoint_every': ft_steps}

  def q(bits, act=0, gran='channel', sym=True):
    out = {'quant.weight_bits': bits, 'quant.act_bits': act, 'quant.granularity': gran}
    if not sym:
      out['quant.symmetric'] = False
    return out

  settings = {  # name -> quant keys
      'w8a8': q(8, 8), 'w8a8-tensor': q(8, 8, 'tensor'), 'w8': q(8),
      'w4': q(4), 'w4-g32': q(4, gran='group'), 'w4-tensor': q(4, gran='tensor'),
      'w4-asym': q(4, sym=False), 'w2': q(2), 'w2-g32': q(2, gran='group')}
  runs = [{'name': 'float'},
          {'name': 'float-ft', **ft}]
  for s in ('w8a8', 'w4', 'w4-g32', 'w4-asym', 'w2', 'w2-g32'):
    runs.append({'name': f'qat-ft-{s}', 'quant.mode': 'qat', **ft, **settings[s]})
  for s in ('w8a8', 'w4'):
    runs.append({'name': f'qat-scratch-{s}', 'quant.mode': 'qat', **settings[s]})
  for s, keys in settings.items():
    runs.append({'name': f'ptq-{s}', 'quant.mode': 'ptq', 'quant.init_from': 'name=float',
                 **keys})
  return runs
