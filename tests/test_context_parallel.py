"""Context parallelism (ring / all-gather attention over ``mesh.sequence``, zigzag load
balancing) and Megatron sequence parallelism, on 8 fake CPU devices (conftest).

* The attention core under a split sequence equals single-device
  ``jax.nn.dot_product_attention`` (forward and gradients) for causal, sliding-window
  (traced), document-segment and padding masks, with GQA; ring and all-gather; the zigzag
  layout for the causal cases and the contiguous one otherwise (as the Transformer picks).
* The trainer's own step, 10 steps, gives the losses of one device with each new axis:
  ring on sequence=4 x fsdp=2 (weights split over fsdp x sequence), all-gather on
  sequence=2 x tensor=2 x data=2, and ``mesh.sequence_parallel`` on tensor=2 x data=4.
  One test trains them all (the runs cost ~45 s of CPU: split into several tests, pytest
  -n 2 would build a shared fixture in both workers).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from research import sharding as shd
from research.config import ConfigError
from research.models import context_parallel as cp
from research.models.attention import attention_mask, document_positions, plan_attention
from tests.helpers import smoke_config

# float32: the sharded runs sum the same numbers in another order (online softmax over
# blocks, sharded matmuls). Measured max |diff| 1.4e-6 for attention outputs and
# gradients (values ~1) and 9.5e-7 for the 10 training losses (~5.5) on every mesh
# here; a wrong mask or a block folded twice moves them by > 1e-2.
ATTN_ATOL = 5e-6
LOSS_ATOL = 2e-5


# --------------------------------------------------------------------------- layout


def test_zigzag_order_and_its_inverse():
  # 2n = 8 chunks of 2: shard i holds chunks i and 7 - i.
  assert cp.zigzag_order(16, 4).tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11,
                                             6, 7, 8, 9]
  x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
  mesh = shd.make_mesh(data=2, sequence=4)
  with shd.use_mesh(mesh):
    z = jax.jit(lambda x: cp.to_zigzag(x)[0])(x)
    back = jax.jit(cp.from_zigzag)(z)
  np.testing.assert_array_equal(z, x[:, cp.zigzag_order(16, 4)])
  np.testing.assert_array_equal(back, x)


def test_zigzag_balances_the_causal_work():
  """Visible (query, key) sub-block pairs per shard: equal with zigzag, not without."""
  # Of the 2 x 2n pairs a shard holds, 2n + 1 are visible under zigzag; contiguous
  # shard i has 4i + 3, so the last shard (the step's time) does 15 where zigzag does 9.
  assert cp.block_work(1024, 4, zigzag=True) == [9] * 4
  assert cp.block_work(1024, 4, zigzag=False) == [3, 7, 11, 15]
  assert cp.block_work(1024, 8, zigzag=True) == [17] * 8


# --------------------------------------------------------------------------- attention

B, L, N, K, H = 2, 32, 4, 2, 8  # GQA: 4 query heads share 2 K/V heads.


def _inputs():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  seg = jnp.asarray(np.sort(rng.integers(1, 4, size=(B, L)), axis=1), jnp.int32)
  pad = jnp.asarray(np.arange(L)[None] < np.array([[L], [21]]), jnp.float32)
  return f(B, L, N, H), f(B, L, K, H), f(B, L, K, H), f(B, L, N, H), seg, pad


# name: (causal, window, segment ids, padding mask). The zigzag layout iff causal.
CASES = {'causal': (True, 0, False, False), 'window': (True, 'traced', False, False),
         'segments': (True, 0, True, False), 'padding_bidirectional': (False, 7, False, True)}


def _reference(q, k, v, causal, window, seg, pad):
  plan = plan_attention('xla', causal=causal, seq_len=L, window=window, mask_BL=pad,
                        segment_ids_BL=seg)
  return jax.nn.dot_product_attention(q, k, v, **plan.kwargs)


def _sharded(q, k, v, causal, window, seg, pad):
  """As the Transformer runs it: causal calls in the zigzag layout, others contiguous."""
  zigzag = causal
  if zigzag:
    q, k, v, seg, pad = cp.to_zigzag(q, k, v, seg, pad)
  with cp.layout(zigzag):
    o = cp.attention(q, k, v, mask_fn=attention_mask, causal=causal, window=window,
                     mask_BL=pad, segment_ids_BL=seg)
  return cp.from_zigzag(o) if zigzag else o


def _cases(fn, names, q, k, v, w, seg, pad, window5):
  """{case: (output, grads of <output, w>)} over real query rows, for one attention fn."""
  out = {}
  for name in names:
    causal, window, use_seg, use_pad = CASES[name]
    args = dict(causal=causal, window=window5 if window == 'traced' else window,
                seg=seg if use_seg else None, pad=pad if use_pad else None)
    rows = (pad if use_pad else jnp.ones((B, L)))[:, :, None, None]
    o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **args) * rows, q, k, v)
    out[name] = (o, vjp(w))
  return out


@pytest.fixture(scope='module')
def reference_attention():
  q, k, v, w, seg, pad = _inputs()
  return jax.jit(lambda *a: _cases(_reference, CASES, *a))(q, k, v, w, seg, pad,
                                                           jnp.int32(5))


# Each case once (a compile per mesh, ~2 s of CPU per case): ring with heads over tensor
# (causal zigzag, bidirectional contiguous), all-gather over 4 shards (window, segments).
@pytest.mark.parametrize('mesh_kw,kind,names', [
    (dict(sequence=2, tensor=2, data=2), 'ring', ('causal', 'padding_bidirectional')),
    (dict(sequence=4, fsdp=2), 'all_gather', ('window', 'segments')),
], ids=['seq2_tp2_dp2_ring', 'seq4_fsdp2_allgather'])
def test_attention_equals_single_device(reference_attention, mesh_kw, kind, names):
  """Outputs and gradients (q, k, v) of the mask cases; the window traced, as under scan."""
  q, k, v, w, seg, pad = _inputs()
  cfg = smoke_config(**{f'mesh.{a}': s for a, s in mesh_kw.items()},
                     **{'mesh.context_parallel': kind})
  with shd.use_mesh(shd.mesh_from_config(cfg.mesh), shd.rules_from_config(cfg.mesh)):
    assert cp.ring() == (kind == 'ring')
    got = jax.jit(lambda *a: _cases(_sharded, names, *a))(q, k, v, w, seg, pad,
                                                          jnp.int32(5))
  for name in names:
    (want_o, want_g), (got_o, got_g) = reference_attention[name], got[name]
    np.testing.assert_allclose(got_o, want_o, atol=ATTN_ATOL, err_msg=name)
    for what, a, b in zip('qkv', got_g, want_g):
      np.testing.assert_allclose(a, b, atol=ATTN_ATOL, err_msg=f'{name}: d{what}')


# --------------------------------------------------------------------------- training

STEPS, BATCH, SEQ, VOCAB = 10, 8, 32, 259
MODEL = {'model.d_model': 32, 'model.num_heads': 4, 'model.num_kv_heads': 2,
         'model.mlp_dim': 64, 'model.num_layers': 2, 'model.vocab_size': VOCAB,
         # Layer 0 local (window 8), layer 1 global: a per-layer window traced by scan.
         'model.sliding_window': 8, 'model.window_layers': 'LG'}
RUN = {'batch_size': BATCH, 'seq_len': SEQ, 'optimizer.learning_rate': 3e-3,
       'optimizer.warmup_steps': 2}
MESHES = {  # name: mesh keys
    'ring_seq4_fsdp2': {'sequence': 4, 'fsdp': 2, 'context_parallel': 'ring'},
    'allgather_seq2_tp2_dp2': {'sequence': 2, 'tensor': 2, 'data': 2,
                               'context_parallel': 'all_gather'},
    'sp_tp2_dp4': {'tensor': 2, 'data': 4, 'sequence_parallel': True},
}


def _config(mesh: dict):
  return smoke_config(**MODEL, **RUN, **{f'mesh.{k}': v for k, v in mesh.items()})


def _batches():
  """Packed documents (segment ids, restarting positions) of a learnable sequence rule."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    seg = np.cumsum(rng.random((BATCH, SEQ + 1)) < 0.1, axis=1).astype(np.int32) + 1
    stride = 1 + seg % 3
    x = (rng.integers(0, 64, size=(BATCH, 1)) + np.cumsum(stride, axis=1)) % 64
    out.append({'inputs': x[:, :-1].astype(np.int32), 'targets': x[:, 1:].astype(np.int32),
                'mask': np.ones((BATCH, SEQ), np.float32), 'segment_ids': seg[:, :-1],
                'positions': np.asarray(document_positions(jnp.asarray(seg[:, :-1])))})
  return out


def _train(config, devices=None, init=None):
  """The trainer's step (research/step.py), 10 steps: (losses, final state, its HLO,
  the initial state on the host).

  ``init`` (a host copy of the one-device run's initial state) is placed on this mesh's
  state shardings (``abstract_train_state``) instead of compiling the sharded initializer
  again: the same numbers, ~5 s of CPU less per mesh.
  """
  from research import step as step_lib
  from research.tasks import make_task
  from research.train_state import abstract_train_state, create_train_state
  mesh = shd.mesh_from_config(config.mesh, devices)
  task = make_task(config)
  if init is None:
    ts = create_train_state(config, mesh, task)
    state = ts.state
  else:
    ts = abstract_train_state(config, mesh, task)
    state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), init, ts.state)
  initial = jax.device_get(state)  # Before the donating step consumes it.
  sharding = step_lib.batch_sharding(mesh, config)
  train_step = step_lib.make_train_step(config, task, ts, sharding)
  losses = []
  with shd.use_mesh(mesh, shd.rules_from_config(config.mesh)):
    compiled = None
    for batch in _batches():
      batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
      compiled = compiled or train_step.lower(state, batch).compile()
      state, metrics = compiled(state, batch)
      losses.append(float(metrics['loss']))
  return np.array(losses), state, compiled.as_text(), initial


def _activation_gathers(hlo: str, rows: int, length: int) -> int:
  """All-gathers whose result is a float32 [rows, length, d_model] activation."""
  return len(re.findall(rf'= f32\[{rows},{length},32\]\S* all-gather(?:-start)?\(', hlo))


def test_trainer_steps_equal_one_device_on_each_axis():
  """10 trainer steps on each mesh of MESHES give the one-device losses (LOSS_ATOL), and:

  * 'embed' -> fsdp x sequence: under sequence=4 x fsdp=2 the query kernel [2, 32, 4, 8]
    is [2, 4, 4, 8] per device, and so is its Adam moment;
  * with mesh.sequence_parallel the residual stream is split along L over 'tensor' and
    all-gathered to full length before the column-parallel projections (q/k/v and MLP
    inputs, forward and backward, each layer); without it (the tensor=2 x sequence=2
    run) no [rows, L or L/2, d_model] activation is ever gathered.
  """
  ref, _, _, init = _train(_config({'data': 1}), devices=jax.devices()[:1])
  assert ref[-1] < ref[0] - 0.2, f'the model did not learn: {ref}'
  runs, diffs = {}, {}
  for name, mesh in MESHES.items():
    runs[name] = _train(_config(mesh), init=init)
    diffs[name] = float(np.abs(runs[name][0] - ref).max())
  assert max(diffs.values()) <= LOSS_ATOL, (
      f'max |loss - loss(1 device)| over 10 steps: {diffs}; one device: {ref}; '
      + '; '.join(f'{n}: {r[0]}' for n, r in runs.items()))

  model, opt = runs['ring_seq4_fsdp2'][1][0], runs['ring_seq4_fsdp2'][1][1]
  kernel = model['blocks']['attn']['query']['kernel'][...]
  mu = opt['opt_state'][1][0]['mu']['blocks']['attn']['query']['kernel'][...]
  for a in (kernel, mu):
    assert a.shape == (2, 32, 4, 8)
    assert a.addressable_shards[0].data.shape == (2, 4, 4, 8)

  assert _activation_gathers(runs['sp_tp2_dp4'][2], BATCH // 4, SEQ) >= 4
  plain = runs['allgather_seq2_tp2_dp2'][2]
  assert _activation_gathers(plain, BATCH // 2, SEQ // 2) == 0
  assert _activation_gathers(plain, BATCH // 2, SEQ) == 0


# --------------------------------------------------------------------------- config


def test_mesh_keys_are_validated_in_one_line():
  from research.validation import check_batch_divisibility
  with pytest.raises(ConfigError, match=r"mesh.context_parallel='rings' is unknown"):
    shd.validate_mesh_config(smoke_config(**{'mesh.context_parallel': 'rings'}).mesh)
  mesh = ml_collections.ConfigDict({**smoke_config().mesh.to_dict(), 'sequence_parallel': 1})
  with pytest.raises(ConfigError, match=r'mesh.sequence_parallel=1 must be True or False'):
    shd.validate_mesh_config(mesh)
  c = smoke_config(**{'seq_len': 36, 'mesh.sequence_parallel': True})
  with pytest.raises(ConfigError, match=r'mesh.sequence\*mesh.tensor=8 but seq_len=36'):
    check_batch_divisibility(c, {'data': 1, 'fsdp': 1, 'sequence': 2, 'tensor': 4}, 1)
  assert dict(shd.rules_from_config(c.mesh))['residual_seq'] == ('sequence', 'tensor')
