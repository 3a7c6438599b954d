r"""GPT-2-style decoder LMs for accelerators: 124M, 350M (GPT-2 shapes) and a 1B-class.

  python -m launch.train --config=experiments/pretrain/gpt2.py:size=124m \
      --config.data.source=tfds --config.data.name=lm1b --workdir=DIR

``size`` is 124m | 350m | 1b. GPT-2 shapes (learned positions, GELU, LayerNorm, tied
embeddings, 50k vocab with a trained SentencePiece tokenizer) for 124m/350m; the 1b
uses the Llama recipe (RoPE, SwiGLU, RMSNorm, GQA, untied) in bfloat16.
Args: ``size``, ``smoke=True``.
"""

from experiments.common import apply_smoke
from research.config import ConfigError, base_config, parse_arg

SIZES = {
    #        d_model layers heads kv  mlp
    '124m': (768, 12, 12, 12, 3072),
    '350m': (1024, 24, 16, 16, 4096),
    '1b': (2048, 16, 16, 8, 5632),
}


def get_config(arg: str | None = None):
  a = parse_arg(arg, size='124m', smoke=False)
  if a.size not in SIZES:
    raise ConfigError(f'config arg size={a.size!r} is unknown; use one of {sorted(SIZES)}.')
  d, layers, heads, kv, mlp = SIZES[a.size]
  c = base_config()
  c.name = f'gpt2_{a.size}'
  c.steps = 100_000
  c.batch_size = 256
  c.seq_len = 1024 if a.size != '1b' else 2048
  c.log_every = 100
  c.eval_every = 2000
  c.eval_steps = 50
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim = d, layers, heads, kv, mlp
  m.max_seq_len = c.seq_len
  m.dtype = 'bfloat16'
  m.remat = 'dots_with_no_batch_dims_saveable'
  if a.size == '1b':
    m.mlp_kind, m.norm, m.positions, m.tie_embeddings = 'swiglu', 'rmsnorm', 'rope', False
  else:
    m.mlp_kind, m.norm, m.positions, m.tie_embeddings = 'gelu', 'layernorm', 'learned', True
  c.data.tokenizer = 'sentencepiece'
  c.data.spm_vocab_size = 32000
  c.optimizer.learning_rate = 6e-4 if a.size == '124m' else 3e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.b2 = 0.95
  c.loss.z_loss = 1e-4
  c.loss.chunk_size = 256  # Never hold [B, L, 32000] float32 logits at once.
  if a.smoke:
    apply_smoke(c)
    c.model.dtype = 'float32'
    c.loss.chunk_size = 8
  return c


def sweep() -> list[dict]:
  return [{'optimizer.learning_rate': lr} for lr in (3e-4, 6e-4, 1.2e-3)]
