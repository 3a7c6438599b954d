r"""Export a structurally pruned run as a real smaller model (fewer heads, smaller MLP).

  python -m research.compress.export --workdir=RUN --out=DIR [--step=-1]

Restores RUN's parameters and pruning masks (any step), reads the kept attention heads
(KV groups) and MLP neurons of every layer from the masks (the same count per layer),
and builds the model of a smaller config: ``model.num_heads`` / ``num_kv_heads`` = the
kept heads, ``model.head_dim`` pinned to the original, ``model.mlp_dim`` = the kept
neurons. Kernels (and biases) are gathered per layer, so the small model computes the
same function as the masked one (checked here on a batch: ``max_abs_logit_diff``).
DIR is a run of its own (``config.json``, ``checkpoints/<step>/`` with the model only,
``summary.json`` with parameter counts and bytes), loadable with
``research.recipe.load_run_model(DIR)`` and usable as ``finetune.init_from``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from research.compress import prune
from research.config import ConfigError

# (regex on the path inside a block, axis of the pruned unit without the layer axis, unit)
_GATHER = (
    (r'attn/query/kernel', 1, 'heads'), (r'attn/query/bias', 0, 'heads'),
    (r'attn/(key|value)/kernel', 1, 'kv'), (r'attn/(key|value)/bias', 0, 'kv'),
    (r'attn/out/kernel', 0, 'heads'),
    (r'mlp/(wi_0|wi_1|wi)/kernel', 1, 'mlp'), (r'mlp/(wi_0|wi_1|wi)/bias', 0, 'mlp'),
    (r'mlp/wo/kernel', 0, 'mlp'),
)


def param_bytes(model: nnx.Module) -> dict[str, int]:
  """Parameter count and float bytes of a model's ``nnx.Param``s (vocab padding included)."""
  n = b = 0
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    x = v.get_value()
    n += int(x.size)
    b += int(x.size) * np.dtype(x.dtype).itemsize
  return {'params': n, 'bytes': b}


def load_pruned_model(workdir: str, step: int = -1):
  """(model with its restored masks, config, step) of a pruning run."""
  from research import recipe
  model, config, step = recipe.load_run_model(workdir, step,
                                              variables=(nnx.Param, prune.PruneMask))
  if config.prune.method == 'none':
    raise ConfigError(f'{workdir} is not a pruning run (prune.method=none).')
  return model, config, step


def _kept(model: nnx.Module) -> dict[str, list[np.ndarray]]:
  """Indices kept per layer: 'kv' (KV heads), 'heads' (query heads), 'mlp' (neurons)."""
  from research.models.attention import Attention
  from research.models.layers import MLP
  out: dict[str, list[np.ndarray]] = {'kv': [], 'heads': [], 'mlp': []}
  for path, mod in prune._student_modules(model):
    stacked = prune._stacked(model, path)
    if isinstance(mod, Attention):
      if isinstance(getattr(mod.key, prune.MASK, None), prune.PruneMask):
        kv = np.asarray(jax.device_get(mod.key.prune_mask[...]))
        kv = (kv if stacked else kv[None]) != 0
        keep_k = kv.any(axis=(1, 3))  # [L, K]
      else:
        L = mod.key.kernel.shape[0] if stacked else 1
        keep_k = np.ones((L, mod.key.kernel.shape[-2]), bool)
      r = mod.query.kernel.shape[-2] // keep_k.shape[1]
      keep_n = np.repeat(keep_k, r, axis=1)
      out['kv'] += [np.nonzero(x)[0] for x in keep_k]
      out['heads'] += [np.nonzero(x)[0] for x in keep_n]
    if isinstance(mod, MLP):
      if isinstance(getattr(mod.wo, prune.MASK, None), prune.PruneMask):
        wo = np.asarray(jax.device_get(mod.wo.prune_mask[...]))
        wo = (wo if stacked else wo[None]) != 0
        keep_f = wo.any(axis=2)  # [L, F]
      else:
        L = mod.wo.kernel.shape[0] if stacked else 1
        keep_f = np.ones((L, mod.wo.kernel.shape[-2]), bool)
      out['mlp'] += [np.nonzero(x)[0] for x in keep_f]
  for unit, idx in out.items():
    counts = sorted({len(i) for i in idx})
    if len(counts) > 1:
      raise ValueError(f'structured export: layers keep different numbers of {unit} '
                       f'({counts}); the smaller config needs one count for all layers.')
  return out


def small_config(config: ml_collections.ConfigDict, kept) -> ml_collections.ConfigDict:
  from research.models.transformer import resolved_dims
  dims = resolved_dims(config.model)
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.num_heads = len(kept['heads'][0])
  c.model.num_kv_heads = 0 if dims['num_kv_heads'] == config.model.num_heads \
      else len(kept['kv'][0])
  c.model.head_dim = dims['head_dim']
  c.model.mlp_dim = len(kept['mlp'][0])
  c.prune.method = 'none'
  c.distill.teacher, c.distill.teacher_config = '', ''
  c.finetune.init_from, c.finetune.pretrain_config = '', ''
  c.quant.init_from = ''
  return c


def shrink(model: nnx.Module, config: ml_collections.ConfigDict):
  """(small model, its config, kept indices): the masked ``model`` without its pruned
  heads and neurons. Host-side (numpy); the small model lives on the default device."""
  from research.tasks import make_task
  kept = _kept(model)
  cfg = small_config(config, kept)
  small = make_task(cfg).build_model()  # No mesh: single-device, eager sharding off.
  scan = prune._stacked(model, 'blocks/x')
  src = {prune._path(p): np.asarray(jax.device_get(v.get_value()))
         for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
         if str(p[0]) != 'teacher'}
  flat = []
  for p, var in nnx.to_flat_state(nnx.state(small, nnx.Param)):
    name = prune._path(p)
    x = src[name]
    m = re.fullmatch(r'blocks/(?:(\d+)/)?(.*)', name)
    if m:
      inner = m.group(2)
      for rx, axis, unit in _GATHER:
        if re.fullmatch(rx, inner):
          if scan:
            x = np.stack([np.take(x[l], kept[unit][l], axis=axis) for l in range(x.shape[0])])
          else:
            x = np.take(x, kept[unit][int(m.group(1))], axis=axis)
          break
    if tuple(x.shape) != tuple(var.shape):
      raise ValueError(f'structured export: {name} {x.shape} vs small model {var.shape}.')
    flat.append((p, var.replace(jnp.asarray(x, dtype=var.get_value().dtype))))
  nnx.update(small, nnx.from_flat_state(flat))
  return small, cfg, kept


def _logits(model, tokens, classification: bool):
  if classification:
    return model(tokens, mask_BL=jnp.ones_like(tokens), deterministic=True)
  return model(tokens, deterministic=True)


def max_logit_diff(big: nnx.Module, small: nnx.Module, config, seed: int = 0) -> float:
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, config.model.vocab_size, (2, min(32, config.seq_len))),
                       jnp.int32)
  cls = config.task == 'classification'
  a = np.asarray(jax.device_get(_logits(big, tokens, cls)), np.float32)
  b = np.asarray(_logits(small, tokens, cls), np.float32)
  return float(np.abs(a - b).max())


def export(workdir: str, out: str, step: int = -1) -> dict[str, Any]:
  """Writes the smaller model of the structured pruning run ``workdir`` to ``out``."""
  from research.finetune.export import write_run
  model, config, step = load_pruned_model(workdir, step)
  if config.prune.method != 'structured':
    raise ConfigError(f'{workdir}: prune.method={config.prune.method!r}; only '
                      f"'structured' pruning exports to a smaller architecture.")
  prune.apply_masks(model)
  small, cfg, kept = shrink(model, config)
  diff = max_logit_diff(model, small, config)
  dense, exported = param_bytes(model), param_bytes(small)
  summary = {'exported_from': os.path.abspath(workdir), 'step': step,
             'num_heads': cfg.model.num_heads, 'num_kv_heads': cfg.model.num_kv_heads,
             'head_dim': cfg.model.head_dim, 'mlp_dim': cfg.model.mlp_dim,
             'dense_params': dense['params'], 'dense_bytes': dense['bytes'],
             'params': exported['params'], 'bytes': exported['bytes'],
             'max_abs_logit_diff': diff}
  write_run(out, workdir, cfg, step, small, summary)
  logging.info('structured export %s -> %s: heads %d, mlp_dim %d, %s -> %s bytes, max '
               '|logit diff| %.2e', workdir, out, cfg.model.num_heads, cfg.model.mlp_dim,
               f'{dense["bytes"]:,}', f'{exported["bytes"]:,}', diff)
  return summary


if __name__ == '__main__':
  from research.finetune.export import export_cli
  export_cli(export, 'structured pruning run')
