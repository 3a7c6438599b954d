"""Next-token cross-entropy in float32 with padding masked out, plus optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array,
            z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over real tokens of cross-entropy (+ PaLM's z-loss ``w * logsumexp^2``).

  Returns ``(loss, aux)``; ``aux`` has ``'ce'`` (mean CE in nats/token), ``'z_loss'``
  (the weighted z term, already included in ``loss``) and ``'num_tokens'`` (sum of the
  mask), all float32 scalars. Positions with mask 0 contribute nothing, not even to
  the denominator, so padding logits cannot change the loss or its gradient.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  mask_BL = mask_BL.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(
      logits_BLV, targets_BL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  num_tokens = mask_BL.sum()
  denom = jnp.maximum(num_tokens, 1.0)
  # where(), not multiply: a NaN/inf logit at a padded position must not leak in.
  ce = jnp.where(mask_BL > 0, lse_BL - target_logit_BL, 0.0).sum() / denom
  z_loss = z_loss_weight * jnp.where(mask_BL > 0, jnp.square(lse_BL), 0.0).sum() / denom
  return ce + z_loss, {'ce': ce, 'z_loss': z_loss, 'num_tokens': num_tokens}


def chunked_lm_loss(hidden_BLD: jax.Array, project, targets_BL: jax.Array, mask_BL: jax.Array,
                    z_loss_weight: float = 0.0, chunk_size: int = 0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``lm_loss(project(hidden), ...)`` without materialising the whole logits tensor.

  The sequence is cut into chunks of ``chunk_size`` positions; each chunk's float32
  logits are computed, reduced to CE and z sums, and discarded. ``jax.checkpoint``
  makes the backward pass recompute them per chunk too, so peak memory holds
  [B, chunk, V] logits instead of [B, L, V] (what matters for 32k-256k vocabularies).
  Value and gradient equal the unchunked loss up to float32 summation order.
  """
  b, l, d = hidden_BLD.shape
  if not chunk_size or chunk_size >= l or l % chunk_size:
    return lm_loss(project(hidden_BLD), targets_BL, mask_BL, z_loss_weight)
  n = l // chunk_size

  def split(x):
    return jnp.swapaxes(x.reshape((b, n, chunk_size) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def chunk_sums(h_BCD, t_BC, m_BC):
    logits = project(h_BCD).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, t_BC[..., None].astype(jnp.int32), axis=-1)[..., 0]
    real = m_BC > 0
    return (jnp.where(real, lse - target, 0.0).sum(), jnp.where(real, jnp.square(lse), 0.0).sum())

  mask = mask_BL.astype(jnp.float32)
  ce_sums, z_sums = jax.lax.map(lambda xs: chunk_sums(*xs),
                                (split(hidden_BLD), split(targets_BL), split(mask)))
  num_tokens = mask.sum()
  denom = jnp.maximum(num_tokens, 1.0)
  ce = ce_sums.sum() / denom
  z_loss = z_loss_weight * z_sums.sum() / denom
  return ce + z_loss, {'ce': ce, 'z_loss': z_loss, 'num_tokens': num_tokens}
