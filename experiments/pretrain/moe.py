r"""Mixture-of-experts decoder LMs: a CPU-sized dense-vs-MoE ablation and a 7B-active size.

  python -m launch.sweep --config=experiments/pretrain/moe.py --workdir=/tmp/moe
  python -m launch.train --config=experiments/pretrain/moe.py:smoke=True --workdir=DIR
  python -m launch.plan --config=experiments/pretrain/moe.py:size=7b --topology=v5p-256

``size=tiny`` (default): the byte-level model of experiments/pretrain/schedules.py
(d_model 128, 2 layers, built-in corpus, 16 x 128 tokens per step, cosine to 10% of
3e-3) whose SwiGLU MLP is replaced by 8 experts of width 256, top-2: the active MLP
parameters equal those of a dense MLP of width 512, and the experts hold 4x as many
parameters in all. ``sweep()`` trains, on the same tokens:

* ``dense``: the dense model at equal *active* parameters (mlp_dim 512);
* ``moe``: 8 experts top-2, dropless (grouped ``ragged_dot`` matmuls);
* ``moe capacity 1.25``: the same with a capacity factor of 1.25 (fixed-shape batched
  matmuls; pairs beyond an expert's capacity dropped);
* ``dense 4x``: dense at equal *total* parameters (mlp_dim 2048), the upper reference.

``size=7b``: Mixtral-style experts at Llama-2-7B's shapes (experiments/pretrain/llama.py)
with 7B *active* parameters: 8 experts of half of Llama's MLP width (5504), top-2, so a
token's active MLP equals Llama-7B's (6.7B active, 19.7B in all). 1M-token batches
(256 x 4096), bf16 compute, float32 master weights and Adam, full remat; mesh: 8-way
expert parallelism x FSDP over the rest (``mesh.expert=8``, ``mesh.fsdp=-1``).
Planned memory per chip: README "Mixture of experts".

Args: ``size`` (tiny | 7b), ``smoke=True`` (seconds on a CPU), ``dense=True`` (the
dense model at equal active parameters), ``capacity_factor`` (0: dropless).
"""

from experiments.common import apply_smoke
from experiments.pretrain import llama, schedules
from research.config import ConfigError, parse_arg

SIZES = ('tiny', '7b')
EXPERTS, TOP_K = 8, 2


def get_config(arg: str | None = None):
  a = parse_arg(arg, size='tiny', smoke=False, dense=False, capacity_factor=0.0)
  if a.size not in SIZES:
    raise ConfigError(f'config arg size={a.size!r} is unknown; use one of {list(SIZES)}.')
  if a.size == '7b':
    c = llama.get_config('size=7b')
    c.name = 'moe_7b'
    c.batch_size = 256
    expert_dim = c.model.mlp_dim // TOP_K  # 5504
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, EXPERTS
  else:
    c = schedules.get_config()
    c.name = 'moe'
    c.steps = 300
    c.eval_every = 150
    c.checkpoint_every = 300
    c.optimizer.warmup_steps = 30
    expert_dim = 256
  m = c.model
  m.moe_num_experts, m.moe_top_k, m.moe_mlp_dim = EXPERTS, TOP_K, expert_dim
  m.moe_capacity_factor = a.capacity_factor
  if a.dense:  # Equal active parameters: one MLP as wide as the top-k experts together.
    m.moe_num_experts, m.mlp_dim = 0, TOP_K * expert_dim
    c.mesh.expert = 1
  if a.smoke:
    apply_smoke(c)  # d_model 32, mlp_dim 64; the experts get half of that each.
    c.num_samples = 1
    m.moe_num_experts = 0 if a.dense else 4
    m.moe_mlp_dim = 32
    m.vocab_size = 0
    c.data.tokenizer = 'bytes'
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 1, 1
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """Dense vs MoE at equal active parameters and equal tokens (module docstring)."""
  c = get_config(arg)
  m = c.model
  active = m.moe_top_k * m.moe_mlp_dim
  return [
      {'model.moe_num_experts': 0, 'model.mlp_dim': active},
      {},
      {'model.moe_capacity_factor': 1.25},
      {'model.moe_num_experts': 0, 'model.mlp_dim': m.moe_num_experts * m.moe_mlp_dim},
  ]
