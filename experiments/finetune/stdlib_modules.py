r"""Fine-tuning ablation on the offline task: which stdlib module is a function from?

The task (research/data/functions_task.py): every function of the standard library,
labelled with its top-level module; the 12 modules with the most functions in both
splits (asyncio, email, tkinter, xml... on CPython 3.11); eval = functions of files
held out by the corpus hash split with data.eval_fraction=0.2, so the pretraining run
below (same fraction) never saw an eval function's file.

The one command (pretrains the tiny LM first if DIR/pretrain has not finished, then
fine-tunes 8 runs and writes DIR/results_finetune.md with accuracy and macro-F1):

  python -m research.finetune.ablation --workdir=/tmp/ft

which is ``launch.sweep`` on this file plus the accuracy table; the same runs by hand:

  python -m launch.sweep --config=experiments/finetune/stdlib_modules.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/ft
  python -m research.finetune.ablation --workdir=/tmp/ft --collect_only

One run by hand (pretrains into the path first if needed):

  python -m launch.train --config=experiments/finetune/stdlib_modules.py:pretrained=/tmp/ft/pretrain \
      --workdir=/tmp/ft_lora --config.finetune.mode=lora --config.finetune.lora_rank=16

Expected (2 CPU cores, ~13 minutes in all): every pretrained row beats its from-scratch
row at the same fine-tuning steps; see README "Fine-tuning" for the measured table.
Args: ``pretrained=DIR`` (where the pretraining run lives), ``smoke=True``.
"""

from experiments.common import apply_smoke
from research.config import base_config, parse_arg

DEFAULT_PRETRAINED = '/tmp/research_finetune/pretrain_tiny'


def get_config(arg: str | None = None):
  a = parse_arg(arg, smoke=False, pretrained=DEFAULT_PRETRAINED)
  c = base_config()
  c.name = 'finetune_stdlib_modules'
  c.task = 'classification'
  c.steps = 400
  c.batch_size = 32
  c.seq_len = 128  # The pretraining length; the median function is ~240 bytes.
  c.log_every = 50
  c.eval_every = 400
  c.eval_steps = 40  # Covers the whole eval split (~1,050 functions at batch 32).
  c.checkpoint_every = 400
  c.num_samples = 0
  c.data.source = 'stdlib'
  c.data.eval_fraction = 0.2
  c.data.document_masking = True  # Packed LM windows (lm_domain) attend within a document.
  # The backbone: experiments/pretrain/tiny.py's shape (a pretrained source overrides
  # these with its own config.json, so from-scratch and pretrained runs match).
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 384
  c.model.max_seq_len = 512
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.01
  f = c.finetune
  f.init_from = a.pretrained
  f.pretrain_config = 'experiments/pretrain/tiny.py'
  f.pretrain_overrides = (('data.eval_fraction', 0.2), ('num_samples', 1))
  f.mode = 'full'
  f.pooling = 'mean'  # Over real tokens; 'last' (the EOS) works too.
  f.lora_rank = 8
  f.lora_alpha = 16.0
  if a.smoke:
    apply_smoke(c)
    c.seq_len = 64
    c.eval_steps = 3
    c.num_samples = 0
    c.finetune.max_train_per_class = 50
    c.finetune.max_eval_per_class = 10
    c.finetune.pretrain_overrides = (('data.eval_fraction', 0.2), ('num_samples', 0))
    c.finetune.pretrain_config = 'experiments/pretrain/tiny.py:smoke=True'
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """From scratch vs from the pretrained checkpoint x (full, LoRA r=4, r=16, probe)."""
  a = parse_arg(arg, smoke=False, pretrained=DEFAULT_PRETRAINED)
  # Each mode at its usual learning rate (the same for both starts): adapters and a
  # lone head take larger steps than full fine-tuning.
  modes = [{'finetune.mode': 'full', 'optimizer.learning_rate': 1e-3},
           {'finetune.mode': 'lora', 'finetune.lora_rank': 4, 'finetune.lora_alpha': 8.0,
            'optimizer.learning_rate': 3e-3},
           {'finetune.mode': 'lora', 'finetune.lora_rank': 16, 'finetune.lora_alpha': 32.0,
            'optimizer.learning_rate': 3e-3},
           {'finetune.mode': 'linear_probe', 'optimizer.learning_rate': 1e-2}]
  return [{'finetune.init_from': init, **m} for init in ('', a.pretrained) for m in modes]
