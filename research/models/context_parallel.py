"""Context parallelism: self-attention over a sequence split across the ``sequence`` axis.

When the logical ``'seq'`` axis is split over mesh axes of total size ``n > 1`` (the
``mesh.sequence`` axis; see research/sharding.py), every device holds ``L / n`` tokens
of every sequence: the activations, the batch columns and (through the ``'embed'`` rule)
a share of the parameters. Everything but attention is position-wise; attention runs here,
in a ``jax.shard_map`` that is manual over the sequence axes only (data/FSDP/tensor
sharding of the batch and heads stays automatic inside):

* **ring** (``mesh.context_parallel='ring'``, rule ``kv_seq -> sequence``): each device
  keeps its queries; the K/V blocks (with their token indices, padding mask and segment
  ids) travel around the ring by ``jax.lax.ppermute``, one hop per step, ``n`` steps;
* **all-gather** (``'all_gather'``, rule ``kv_seq -> none``): K/V are all-gathered once
  and the same ``n`` blocks are visited in the same order (so the two give bitwise
  equal results; they differ in communication pattern and memory).

Each step folds one K/V block into an online softmax (running max, sum and weighted
values in float32, flash-attention style) and is rematerialised (``jax.checkpoint``), so
a device never holds more than a ``[L/(2n), L/(2n)]`` tile of logits per head, in the
forward or the backward pass. The local queries and each K/V block are cut in two
sub-blocks; a ``(query, key)`` sub-block pair whose mask is all False (causal future,
outside the sliding window, other documents, padding) is skipped by ``lax.cond``.

**Load balancing (zigzag).** With causal masking and a contiguous split, device ``n-1``
has work in every step while device 0 has it only on its diagonal. When the model is
causal and ``L % 2n == 0`` the Transformer reorders the sequence once at the start
(:func:`to_zigzag`): cut into ``2n`` chunks, device ``i`` holds chunks ``i`` and
``2n-1-i``, so every device has the same number of visible sub-blocks
(:func:`block_work`); tokens, positions, padding mask and segment ids are permuted
together, the attention masks use the original token indices (:func:`zigzag_order`),
and the final hidden states are put back in order (:func:`from_zigzag`) before the
output head, so the model's outputs and every loss are unchanged. Each reorder is two
``ppermute`` hops of the local block.

Masks: causal, sliding window (a static or traced per-layer window), padding and
document segment ids all compose, from the original indices; GQA keeps the ``K`` K/V
heads (queries are grouped ``[K, N/K]``); RoPE is applied before, from the permuted
positions. A query row with no visible key at all gives 0 (``jax.nn.dot_product_attention``
gives the mean of V there; such rows are padding and masked out downstream).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.sharding import PartitionSpec as P

# The sequence layout the current Transformer call runs in (set by Transformer.__call__
# around its blocks, read by the attention): True = zigzag (see the module docstring).
_ZIGZAG = contextvars.ContextVar('context_parallel_zigzag', default=False)


# --------------------------------------------------------------------------- mesh


def _rule_axes(name: str) -> tuple[str, ...]:
  rules = spmd.get_logical_axis_rules()
  if not rules:
    return ()
  target = dict(rules).get(name)
  return (target,) if isinstance(target, str) else tuple(target or ())


def sequence_axes() -> tuple[str, ...]:
  """The mesh axes (size > 1, not already manual) that the logical ``'seq'`` is split over."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  manual = set(getattr(mesh, 'manual_axes', ()) or ())
  return tuple(a for a in _rule_axes('seq')
               if a in mesh.shape and mesh.shape[a] > 1 and a not in manual)


def num_shards(axes: tuple[str, ...] | None = None) -> int:
  axes = sequence_axes() if axes is None else axes
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes) if axes else 1


def active(seq_len: int) -> bool:
  """Whether attention over ``seq_len`` tokens runs context-parallel here."""
  n = num_shards()
  return n > 1 and seq_len % n == 0


def uses_zigzag(seq_len: int, causal: bool) -> bool:
  """Whether the Transformer should reorder a (non-cached) call into the zigzag layout."""
  n = num_shards()
  return causal and n > 1 and seq_len % (2 * n) == 0


def ring() -> bool:
  """Ring (K/V blocks rotate: rule ``kv_seq`` = the sequence axes) or all-gather (none)."""
  return bool(_rule_axes('kv_seq'))


@contextlib.contextmanager
def layout(zigzag: bool) -> Iterator[None]:
  """The sequence layout of the blocks applied inside (the Transformer sets it)."""
  token = _ZIGZAG.set(bool(zigzag))
  try:
    yield
  finally:
    _ZIGZAG.reset(token)


# --------------------------------------------------------------------------- zigzag


def zigzag_order(seq_len: int, n: int) -> np.ndarray:
  """Original token index at each position of the zigzag layout: ``[L]`` int32.

  ``L`` is cut into ``2n`` chunks; shard ``i`` holds chunks ``i`` and ``2n-1-i``.
  """
  c = seq_len // (2 * n)
  chunks = [k for i in range(n) for k in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(k * c, (k + 1) * c) for k in chunks]).astype(np.int32)


def _shard_ids(n: int) -> jax.Array:
  """``arange(n)``, split over the sequence axes: each shard reads its own index.

  (``lax.axis_index`` lowers to a PartitionId that XLA's partitioner refuses inside a
  shard_map that is manual over only some axes.)
  """
  return jnp.arange(n, dtype=jnp.int32)


def _dest(k: int, n: int) -> int:
  """The shard that holds chunk ``k`` in the zigzag layout."""
  return k if k < n else 2 * n - 1 - k


def _reorder(x: jax.Array, axis: int, inverse: bool) -> jax.Array:
  """Contiguous <-> zigzag along ``axis`` (split over the sequence axes): two ppermutes.

  Contiguous shard ``j`` holds chunks ``2j`` (even) and ``2j+1`` (odd); zigzag shard
  ``i`` holds chunks ``i`` and ``2n-1-i``, exactly one of them even. The even chunks
  move by one permutation of the shards and the odd ones by another.
  """
  axes = sequence_axes()
  n = num_shards(axes)
  even = [(j, _dest(2 * j, n)) for j in range(n)]
  odd = [(j, _dest(2 * j + 1, n)) for j in range(n)]
  if inverse:
    even, odd = [(b, a) for a, b in even], [(b, a) for a, b in odd]
  spec = P(*([None] * axis), axes)

  def local(x, shard):
    i = shard[0]
    a, b = jnp.split(x, 2, axis=axis)
    if not inverse:  # Contiguous (a = chunk 2i, b = 2i+1) -> zigzag.
      ra = jax.lax.ppermute(a, axes, even)  # Receives an even chunk.
      rb = jax.lax.ppermute(b, axes, odd)
      i_even = (i % 2) == 0  # Chunk i (slot 0) is even iff i is.
      return jnp.concatenate([jnp.where(i_even, ra, rb), jnp.where(i_even, rb, ra)], axis)
    i_even = (i % 2) == 0  # Zigzag -> contiguous: send the even chunk one way.
    ev, od = jnp.where(i_even, a, b), jnp.where(i_even, b, a)
    return jnp.concatenate([jax.lax.ppermute(ev, axes, even),
                            jax.lax.ppermute(od, axes, odd)], axis)

  return jax.shard_map(local, in_specs=(spec, P(axes)), out_specs=spec,
                       axis_names=set(axes))(x, _shard_ids(n))


def to_zigzag(*xs: jax.Array | None, axis: int = 1) -> tuple[jax.Array | None, ...]:
  """Reorders each array's sequence ``axis`` into the zigzag layout (None passes)."""
  return tuple(None if x is None else _reorder(x, axis, inverse=False) for x in xs)


def from_zigzag(x: jax.Array, axis: int = 1) -> jax.Array:
  """The inverse of :func:`to_zigzag`."""
  return _reorder(x, axis, inverse=True)


def block_work(seq_len: int, n: int, zigzag: bool, window: int = 0) -> list[int]:
  """Visible ``(query, key)`` sub-block pairs each shard computes (causal), per shard.

  The per-step attention FLOPs of a shard are proportional to this; the step time to
  its maximum over shards.
  """
  idx = zigzag_order(seq_len, n) if zigzag else np.arange(seq_len)
  blocks = idx.reshape(2 * n, -1)  # Shard i: sub-blocks 2i, 2i+1.
  out = []
  for i in range(n):
    count = 0
    for qa in blocks[2 * i:2 * i + 2]:
      for kb in blocks:
        d = qa[:, None] - kb[None, :]
        ok = d >= 0
        if window:
          ok &= d < window
        count += bool(ok.any())
    out.append(count)
  return out


# --------------------------------------------------------------------------- attention


MaskFn = Callable[..., jax.Array]


def _fold(carry, q_a, k_b, v_b, ok_ab):
  """One K/V sub-block into the online softmax of one query sub-block (float32).

  carry: o ``[B, la, K, G, Dh]``, m and l ``[B, K, G, la]`` (running max, running sum).
  ``ok_ab``: ``[B|1, 1, la, lb]`` visibility, or None (all visible).
  """
  o, m, l = carry
  scale = 1.0 / math.sqrt(q_a.shape[-1])
  s = jnp.einsum('blkgh,bskh->bkgls', q_a, k_b, preferred_element_type=jnp.float32) * scale
  if ok_ab is not None:
    s = jnp.where(ok_ab[:, :, None], s, -jnp.inf)
  # The max only stabilises exp(); the result does not depend on it.
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(s - m_safe[..., None])
  corr = jnp.exp(m - m_safe)
  l_new = l * corr + p.sum(-1)
  pv = jnp.einsum('bkgls,bskh->blkgh', p.astype(v_b.dtype), v_b,
                  preferred_element_type=jnp.float32)
  o_new = o * jnp.moveaxis(corr, -1, 1)[..., None] + pv
  return o_new, m_new, l_new


_fold_remat = jax.checkpoint(_fold)


def attention(q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array, *,
              mask_fn: MaskFn, causal: bool, window: int | jax.Array = 0,
              mask_BL: jax.Array | None = None, segment_ids_BL: jax.Array | None = None
              ) -> jax.Array:
  """Context-parallel self-attention; the result equals ``jax.nn.dot_product_attention``.

  Arrays are the global (jit-level) views, sequence axis split over
  :func:`sequence_axes`; the layout (zigzag or contiguous) is the current
  :func:`layout`. ``mask_fn`` is ``attention.attention_mask`` (passed in: that module
  imports this one). Returns ``[B, L, N, Dh]`` in ``q``'s dtype.
  """
  axes = sequence_axes()
  n = num_shards(axes)
  B, L, N, Dh = q_BLNH.shape
  K = k_BLKH.shape[2]
  zigzag = _ZIGZAG.get()
  index_L = jnp.asarray(zigzag_order(L, n) if zigzag else np.arange(L, dtype=np.int32))
  traced_window = not isinstance(window, (int, np.integer))
  masked = causal or traced_window or window > 0 or mask_BL is not None \
      or segment_ids_BL is not None
  use_ring = ring()

  seq = P(None, axes)
  args = {'q': q_BLNH, 'k': k_BLKH, 'v': v_BLKH, 'idx': index_L, 'mask': mask_BL,
          'seg': segment_ids_BL, 'window': window if traced_window else None,
          'shard': _shard_ids(n)}
  specs = {'q': P(None, axes, None, None), 'k': P(None, axes, None, None),
           'v': P(None, axes, None, None), 'idx': P(axes), 'mask': seq, 'seg': seq,
           'window': P(), 'shard': P(axes)}
  present = {k: v for k, v in args.items() if v is not None}

  def local(a):
    q, idx = a['q'], a['idx']
    Lq = q.shape[1]
    sub = 2 if Lq % 2 == 0 else 1
    la = Lq // sub
    q = q.reshape(q.shape[0], Lq, K, N // K, Dh)
    q_seg = a.get('seg')
    w = a['window'] if 'window' in a else window
    kv = {k: a[k] for k in ('k', 'v', 'idx', 'mask', 'seg') if k in a}
    me = a['shard'][0]
    if not use_ring:
      gathered = {k: jax.lax.all_gather(x, axes, axis=0 if k == 'idx' else 1, tiled=True)
                  for k, x in kv.items()}

    def part(x, t):  # Sub-block t of a local array's sequence axis (None passes).
      if x is None:
        return None
      return jax.lax.slice_in_dim(x, t * la, (t + 1) * la, axis=0 if x.ndim == 1 else 1)

    def fold_block(carries, blk):
      """Every (query, key) sub-block pair of the local queries and one K/V block."""
      carries = list(carries)
      for t in range(sub):
        q_t, qi_t, qs_t = part(q, t), part(idx, t), part(q_seg, t)
        for u in range(sub):
          k_u, v_u = part(blk['k'], u), part(blk['v'], u)
          if not masked:
            carries[t] = _fold_remat(carries[t], q_t, k_u, v_u, None)
            continue
          ok = mask_fn(qi_t, part(blk['idx'], u), causal=causal, window=w,
                       mask_BS=part(blk.get('mask'), u), q_segment_BL=qs_t,
                       k_segment_BS=part(blk.get('seg'), u))
          carries[t] = jax.lax.cond(
              jnp.any(ok), lambda c, q_t=q_t, k_u=k_u, v_u=v_u, ok=ok: _fold_remat(
                  c, q_t, k_u, v_u, ok), lambda c: c, carries[t])
      return tuple(carries)

    Bq = q.shape[0]
    carries = tuple((jnp.zeros((Bq, la, K, N // K, Dh), jnp.float32),
                     jnp.full((Bq, K, N // K, la), -jnp.inf, jnp.float32),
                     jnp.zeros((Bq, K, N // K, la), jnp.float32)) for _ in range(sub))
    # The accumulators differ per shard (shard_map's varying-manual-axes types).
    carries = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to='varying'), carries)
    # A scan over the n steps (not unrolled: the compiled size does not grow with n).
    if use_ring:  # n - 1 (fold, pass the block on) steps, then the last block.
      perm = [(j, (j + 1) % n) for j in range(n)]

      def ring_step(carry, _):
        carries, kv = carry
        carries = fold_block(carries, kv)
        return (carries, {k: jax.lax.ppermute(x, axes, perm) for k, x in kv.items()}), None

      (carries, kv), _ = jax.lax.scan(ring_step, (carries, kv), None, length=n - 1)
      carries = fold_block(carries, kv)
    else:  # Step s folds the block of shard (me - s) % n, as the ring would deliver it.
      def gather_step(carries, step):
        src = (me - step) % n
        blk = {k: jax.lax.dynamic_slice_in_dim(x, src * Lq, Lq, axis=0 if k == 'idx' else 1)
               for k, x in gathered.items()}
        return fold_block(carries, blk), None

      carries, _ = jax.lax.scan(gather_step, carries, jnp.arange(n))
    outs = []
    for o, _, l in carries:
      l = jnp.moveaxis(l, -1, 1)[..., None]  # [B, la, K, G, 1]
      outs.append(o / jnp.where(l == 0, 1.0, l))
    o = jnp.concatenate(outs, axis=1).reshape(Bq, Lq, N, Dh)
    return o.astype(q_BLNH.dtype)

  in_specs = ({k: specs[k] for k in present},)
  return jax.shard_map(local, in_specs=in_specs, out_specs=P(None, axes, None, None),
                       axis_names=set(axes))(present)
