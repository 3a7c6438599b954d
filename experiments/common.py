"""Pieces shared by experiment configs (not a place for logic: sizes only)."""

import ml_collections


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks every size so the config runs in seconds on a CPU (tests, CI)."""
  c.steps = 6
  c.batch_size = 8
  c.seq_len = 32
  c.log_every = 2
  c.eval_every = 3
  c.eval_steps = 2
  c.checkpoint_every = 3
  c.num_samples = 1
  c.sample_len = 8
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 0
  c.model.head_dim = 0
  c.model.mlp_dim = 64
  c.model.max_seq_len = 64
  c.model.dtype = 'float32'
  c.optimizer.warmup_steps = 2
  c.optimizer.grad_accum_steps = 1
  c.data.spm_vocab_size = 300
  c.data.spm_train_chars = 200_000
  return c
