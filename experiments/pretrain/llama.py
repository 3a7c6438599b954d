r"""Llama-2-shaped decoder LMs (7B, 13B, 70B) for accelerator clusters, and their mesh plans.

  python -m launch.train --config=experiments/pretrain/llama.py:size=7b \
      --config.data.source=tfds --config.data.name=c4 --workdir=DIR
  python -m launch.plan --config=experiments/pretrain/llama.py:size=7b --mesh=1,256,1 \
      --device_memory_gb=80

``size`` is 7b | 13b | 70b: Llama 2 shapes (RoPE, SwiGLU, RMSNorm eps 1e-5, untied
embeddings, 32k SentencePiece vocabulary, 4096-token context; 70b uses GQA with 8
key/value heads). float32 master weights and Adam state, bfloat16 compute, full
rematerialisation of each block. The global batch is 1024 x 4096 = 4M tokens (as in the
Llama 2 paper), peak learning rate 3e-4 (1.5e-4 for 70b), 2000 warmup steps.

Default meshes: 7b/13b are pure FSDP (ZeRO-3) over all devices (``mesh.fsdp=-1``); 70b
is FSDP x 8-way tensor parallelism (``mesh.tensor=8``, Megatron-style heads/MLP), the
tensor axis meant to stay inside one 8-GPU node. What ``launch.plan`` reports for these
(per-device memory, FLOPs, collectives) is in README "Scaling". A run at these sizes
needs a cluster; this file is also what the planner's tests and the README figures use.
Args: ``size``, ``smoke=True`` (a tiny model with the same recipe, seconds on a CPU).
"""

from experiments.common import apply_smoke
from research.config import ConfigError, base_config, parse_arg

SIZES = {
    #       d_model layers heads kv   mlp
    '7b': (4096, 32, 32, 32, 11008),
    '13b': (5120, 40, 40, 40, 13824),
    '70b': (8192, 80, 64, 8, 28672),
}


def get_config(arg: str | None = None):
  a = parse_arg(arg, size='7b', smoke=False)
  if a.size not in SIZES:
    raise ConfigError(f'config arg size={a.size!r} is unknown; use one of {sorted(SIZES)}.')
  d, layers, heads, kv, mlp = SIZES[a.size]
  c = base_config()
  c.name = f'llama_{a.size}'
  c.steps = 500_000
  c.batch_size = 1024
  c.seq_len = 4096
  c.log_every = 100
  c.eval_every = 2000
  c.eval_steps = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  m = c.model
  m.vocab_size = 32000
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = d, layers, heads, kv, mlp
  m.mlp_kind, m.norm, m.positions, m.tie_embeddings = 'swiglu', 'rmsnorm', 'rope', False
  m.norm_eps = 1e-5
  m.max_seq_len = c.seq_len
  m.dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.remat = 'full'
  c.data.tokenizer = 'sentencepiece'
  c.data.spm_vocab_size = 32000
  o = c.optimizer
  o.learning_rate = 1.5e-4 if a.size == '70b' else 3e-4
  o.warmup_steps = 2000
  o.b1, o.b2, o.eps = 0.9, 0.95, 1e-5
  o.weight_decay = 0.1
  o.clip_norm = 1.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 8 if a.size == '70b' else 1
  if a.smoke:
    apply_smoke(c)
    c.model.vocab_size = 0  # The smoke run's byte/small tokenizer decides.
    c.model.num_kv_heads = 2 if a.size == '70b' else 0
    c.model.remat = 'full'
    c.data.tokenizer = 'bytes'
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  return c


def sweep() -> list[dict]:
  """Peak learning-rate ablation around the Llama 2 value."""
  return [{'optimizer.learning_rate': lr} for lr in (1.5e-4, 3e-4, 6e-4)]
