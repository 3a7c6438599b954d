"""Text generation from any run directory (research/run_source.py) with the KV-cache
decoder (research/decode.py): what ``launch.generate`` prints, importable."""

from __future__ import annotations

from research.runtime import UserError


def generate_from_run(run: str, prompts: list[str], *, step: int = -1,
                      max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 200,
                      seed: int = 0) -> list[dict]:
  """One result dict per prompt, in order (see module doc)."""
  import jax
  import numpy as np
  from research import run_source
  from research.decode import generate
  if max_new_tokens < 1:
    raise UserError(f'--max_new_tokens={max_new_tokens} must be >= 1.')
  if temperature < 0 or top_k < 0:
    raise UserError('--temperature and --top_k must be >= 0.')
  loaded = run_source.load(run, step)
  tok = loaded.tokenizer
  eos = getattr(tok, 'eos_id', None)
  max_len = int(loaded.config.model.max_seq_len)
  encoded = []
  for p in prompts:
    ids = np.asarray(tok.encode(p), np.int32)
    if len(ids) == 0:
      ids = np.asarray([eos if eos is not None else 0], np.int32)
    if len(ids) + max_new_tokens > max_len:
      raise UserError(
          f'prompt of {len(ids)} tokens + --max_new_tokens={max_new_tokens} exceeds the '
          f'model\'s max_seq_len={max_len}; shorten the prompt or --max_new_tokens.')
    encoded.append(ids)
  groups: dict[int, list[int]] = {}
  for i, ids in enumerate(encoded):
    groups.setdefault(len(ids), []).append(i)
  out: list[dict] = [{} for _ in prompts]
  rng = jax.random.key(seed)
  with run_source.use_mesh(loaded):
    for length, idx in sorted(groups.items()):
      rng, sub = jax.random.split(rng)
      tokens = generate(loaded.model, np.stack([encoded[i] for i in idx]),
                        max_new_tokens=max_new_tokens, rng=sub, temperature=temperature,
                        top_k=top_k, eos_id=eos)
      for row, i in zip(tokens, idx):
        new = [int(t) for t in row[length:]]
        stopped = eos is not None and eos in new
        if stopped:
          new = new[:new.index(eos)]
        out[i] = {'prompt': prompts[i], 'completion': tok.decode(new),
                  'new_tokens': len(new), 'stopped_at_eos': stopped,
                  'run': loaded.path, 'step': loaded.step}
  return out
