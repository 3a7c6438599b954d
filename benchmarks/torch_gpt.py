"""A GPT-2-style decoder LM in PyTorch: the reference side of this project's benchmarks.

Written for this repository (not copied from nanoGPT) to be the same network as
``research.models.transformer.Transformer`` with the GPT-2 block settings
(``model.mlp_kind='gelu'``, ``norm='layernorm'``, ``positions='learned'``,
``tie_embeddings=True``): pre-norm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))``, a
fused QKV projection, causal ``scaled_dot_product_attention``, a 4x GELU (tanh) MLP,
learned positions, a final LayerNorm and logits from the tied token table. The token
table has the same padded rows as ours (a multiple of 128) and logits are sliced back
to the real vocabulary, so both sides do the same matmuls.

Training matches our default optimizer: global-norm clipping, then AdamW with weight
decay on the projection matrices only (ours: ``optimizer.no_decay_regex`` exempts
norms, biases and embeddings), with a per-step learning rate the caller passes.

This module imports only torch and numpy: the benchmark's PyTorch child process never
loads JAX (and ours never loads torch), so neither pays for the other's import.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class GPTSpec:
  """Shape and optimizer of the reference; built from our resolved config."""
  n_layer: int
  n_head: int
  d_model: int
  mlp_dim: int
  max_seq_len: int  # Rows of the learned position table.
  vocab_size: int  # Real vocabulary (logits are sliced to it).
  padded_vocab: int  # Rows of the token table.
  seq_len: int
  batch_size: int
  norm_eps: float = 1e-6
  bias: bool = False
  init_std: float = 0.02
  learning_rate: float = 2e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'GPTSpec':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class Block(nn.Module):
  def __init__(self, s: GPTSpec):
    super().__init__()
    d = s.d_model
    self.n_head = s.n_head
    self.ln_1 = nn.LayerNorm(d, eps=s.norm_eps)
    self.qkv = nn.Linear(d, 3 * d, bias=s.bias)
    self.proj = nn.Linear(d, d, bias=s.bias)
    self.ln_2 = nn.LayerNorm(d, eps=s.norm_eps)
    self.fc = nn.Linear(d, s.mlp_dim, bias=s.bias)
    self.fc_out = nn.Linear(s.mlp_dim, d, bias=s.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, l, d = x.shape
    h = self.n_head
    q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
    # [B, L, H*Dh] -> [B, H, L, Dh]: head h is columns h*Dh..(h+1)*Dh (ours: [N, Dh]).
    q, k, v = (t.view(b, l, h, d // h).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, l, d))
    return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate='tanh'))


class GPT(nn.Module):
  def __init__(self, s: GPTSpec):
    super().__init__()
    if s.d_model % s.n_head:
      raise ValueError(f'd_model={s.d_model} is not divisible by n_head={s.n_head}.')
    self.spec = s
    self.wte = nn.Embedding(s.padded_vocab, s.d_model)
    self.wpe = nn.Embedding(s.max_seq_len, s.d_model)
    self.blocks = nn.ModuleList([Block(s) for _ in range(s.n_layer)])
    self.ln_f = nn.LayerNorm(s.d_model, eps=s.norm_eps)
    self._init(s)

  def _init(self, s: GPTSpec) -> None:
    """N(0, std) weights, zero biases; residual outputs std / sqrt(2 L) (GPT-2; ours too)."""
    out_std = s.init_std / math.sqrt(2 * s.n_layer)
    for name, p in self.named_parameters():
      if name.endswith('bias'):
        nn.init.zeros_(p)
      elif '.ln_' in name or name.startswith('ln_'):
        nn.init.ones_(p)
      elif name.endswith(('proj.weight', 'fc_out.weight')):
        nn.init.normal_(p, 0.0, out_std)
      else:
        nn.init.normal_(p, 0.0, s.init_std)

  def forward(self, idx: torch.Tensor) -> torch.Tensor:
    """Token ids [B, L] -> logits [B, L, vocab_size]."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = self.wte(idx) + self.wpe(pos)
    for block in self.blocks:
      x = block(x)
    logits = self.ln_f(x) @ self.wte.weight.t()
    return logits[..., :self.spec.vocab_size]

  def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = self(idx)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: GPT) -> torch.optim.Optimizer:
  """AdamW; decay on the 2-D projection weights only (as ``optimizer.no_decay_regex``)."""
  s = model.spec
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    is_proj = p.dim() == 2 and name.startswith('blocks.')
    (decay if is_proj else no_decay).append(p)
  groups = [{'params': decay, 'weight_decay': s.weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.b1, s.b2), eps=s.eps)


def train_step(model: GPT, opt: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, lr: float) -> float:
  """One update: forward, backward, clip, AdamW at ``lr``. Returns the loss."""
  for g in opt.param_groups:
    g['lr'] = lr
  loss = model.loss(inputs, targets)
  opt.zero_grad(set_to_none=True)
  loss.backward()
  if model.spec.clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.spec.clip_norm)
  opt.step()
  return float(loss.detach())


@torch.no_grad()
def eval_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> float:
  model.eval()
  loss = float(model.loss(inputs, targets))
  model.train()
  return loss


@torch.no_grad()
def load_research_params(model: GPT, flat: dict[str, np.ndarray]) -> None:
  """Copies our Transformer's parameters (``'/'``-joined paths -> arrays) into ``model``.

  Accepts scanned (``blocks/attn/query/kernel`` with a leading layer axis) and unrolled
  (``blocks/<i>/...``) layouts. Our kernels are ``[in..., out...]``; torch's Linear
  weights are ``[out, in]``, so each is flattened to 2-D and transposed.
  """
  s = model.spec
  d = s.d_model

  def layer(path: str, i: int) -> np.ndarray:
    if f'blocks/{i}/{path}' in flat:
      return np.asarray(flat[f'blocks/{i}/{path}'])
    return np.asarray(flat[f'blocks/{path}'])[i]

  def put(p: torch.Tensor, a: np.ndarray) -> None:
    a = np.array(a, dtype=np.float32).reshape(p.shape)  # A writable copy.
    p.copy_(torch.from_numpy(a))

  put(model.wte.weight, flat['embed/embedding'])
  put(model.wpe.weight, flat['pos_embed/embedding'])
  put(model.ln_f.weight, flat['final_norm/scale'])
  put(model.ln_f.bias, flat['final_norm/bias'])
  for i, blk in enumerate(model.blocks):
    put(blk.ln_1.weight, layer('attn_norm/scale', i))
    put(blk.ln_1.bias, layer('attn_norm/bias', i))
    put(blk.ln_2.weight, layer('mlp_norm/scale', i))
    put(blk.ln_2.bias, layer('mlp_norm/bias', i))
    qkv = [layer(f'attn/{n}/kernel', i).reshape(d, d).T for n in ('query', 'key', 'value')]
    put(blk.qkv.weight, np.concatenate(qkv, 0))
    put(blk.proj.weight, layer('attn/out/kernel', i).reshape(d, d).T)
    put(blk.fc.weight, layer('mlp/wi/kernel', i).T)
    put(blk.fc_out.weight, layer('mlp/wo/kernel', i).T)
    if s.bias:
      put(blk.qkv.bias, np.concatenate(
          [layer(f'attn/{n}/bias', i).reshape(d) for n in ('query', 'key', 'value')]))
      put(blk.proj.bias, layer('attn/out/bias', i))
      put(blk.fc.bias, layer('mlp/wi/bias', i))
      put(blk.fc_out.bias, layer('mlp/wo/bias', i))


def benchmark(spec: GPTSpec, *, steps: int, warmup: int, threads: int,
              started_unix: float) -> dict[str, Any]:
  """Times ``train_step`` on a fixed random batch (as ours: no input pipeline).

  ``first_step_done_unix`` lets the parent compute the time to first step from the
  moment it started this process (imports, model build and the first step).
  """
  import resource

  torch.set_num_threads(threads)
  torch.manual_seed(spec.seed)
  model = GPT(spec)
  opt = make_optimizer(model)
  g = torch.Generator().manual_seed(spec.seed)
  tokens = torch.randint(3, spec.vocab_size, (spec.batch_size, spec.seq_len + 1), generator=g)
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  loss = train_step(model, opt, inputs, targets, spec.learning_rate)
  first_done = time.time()
  for _ in range(max(warmup - 1, 0)):
    train_step(model, opt, inputs, targets, spec.learning_rate)
  times = []
  ru0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    t = time.perf_counter()
    loss = train_step(model, opt, inputs, targets, spec.learning_rate)
    times.append(time.perf_counter() - t)
  ru1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
  params = sum(p.numel() for p in model.parameters())
  return {'side': 'torch', 'torch_version': torch.__version__,
          'threads': torch.get_num_threads(), 'param_count': params,
          'step_times_s': times, 'cpu_s_per_step': cpu / steps,
          'first_step_done_unix': first_done, 'started_unix': started_unix,
          'final_loss': loss}


def main(argv: list[str] | None = None) -> None:
  """The side-by-side harness's PyTorch child (``benchmarks/side_by_side.py``)."""
  import argparse
  import json
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--spec', required=True, help='JSON file of a GPTSpec.')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--out', required=True)
  p.add_argument('--started_unix', type=float, default=None)
  a = p.parse_args(argv)
  with open(a.spec) as f:
    spec = GPTSpec.from_dict(json.load(f))
  report = benchmark(spec, steps=a.steps, warmup=a.warmup, threads=a.threads,
                     started_unix=a.started_unix or time.time())
  report['spec'] = dataclasses.asdict(spec)
  with open(a.out, 'w') as f:
    json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
