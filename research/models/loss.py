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
