r"""Pruning: sparsity level x method, fine-tuning a pretrained tiny LM.

  python -m launch.sweep --config=experiments/compress/prune.py:dense=/tmp/dense \
      --workdir=/tmp/prune

With ``dense=PATH`` every run starts from that float run (the ``tiny`` LM, trained there
first by the first run that needs it: ``finetune.pretrain_config``, file-locked) and
fine-tunes ``steps`` steps while pruning; without it, runs prune while training from
scratch. Methods: ``magnitude`` (Zhu & Gupta's cubic schedule from step 1 to 3/4 of
the run, masks updated every steps/20), ``nm`` (2:4, one-shot at step 1; sparsity
fixed at 0.5, so one run) and ``structured`` (attention heads and MLP neurons by
weight norm, same schedule). Each run writes ``sparsity.json`` (real per-layer
sparsity and bytes); a structured run exports to a smaller model with
``python -m research.compress.export --workdir=RUN --out=RUN/export``.
Expected (Zhu & Gupta 2017; Mishra et al. 2021): gradual magnitude pruning loses
little at 0.5, more at 0.9; 2:4 is close to 0.5 unstructured; structured pruning loses
the most at equal sparsity.

Args: ``smoke=True``, ``dense=PATH`` (absolute), ``steps=200``, ``dense_steps=400``.
"""

from experiments.common import apply_smoke
from experiments.pretrain import tiny
from research.config import parse_arg

_ARGS = dict(smoke=False, dense='', steps=200, dense_steps=400)


def get_config(arg: str | None = None):
  a = parse_arg(arg, **_ARGS)
  c = tiny.get_config()
  c.name = 'prune'
  c.steps = a.steps
  c.eval_every = c.checkpoint_every = c.steps
  c.eval_steps = 16
  c.num_samples = 0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.prune.method = 'magnitude'
  c.prune.sparsity = 0.5
  c.prune.begin_step = 1
  c.prune.end_step = max(1, 3 * c.steps // 4)
  c.prune.frequency = max(1, c.steps // 20)
  if a.dense:
    c.finetune.init_from = a.dense
    smoke = ',smoke=True' if a.smoke else ''
    c.finetune.pretrain_config = f'experiments/compress/distill_teacher.py:teacher_steps={a.dense_steps}{smoke}'
  if a.smoke:
    apply_smoke(c)
    c.num_samples = 0
    c.optimizer.warmup_steps = 1
    c.prune.end_step = 4
    c.prune.frequency = 1
    c.eval_every = c.checkpoint_every = c.steps
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """sparsity in {0.5, 0.75, 0.9} x {magnitude, structured}, plus 2:4."""
  runs = [{'prune.method': m, 'prune.sparsity': s}
          for m in ('magnitude', 'structured') for s in (0.5, 0.75, 0.9)]
  runs.append({'prune.method': 'nm', 'prune.sparsity': 0.5})
  return runs
