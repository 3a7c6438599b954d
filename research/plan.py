"""Ahead-of-time plan of a training run on a mesh: memory, FLOPs and collectives.

``plan(config)`` lowers and compiles the real train step (the trainer's
:func:`research.step.make_train_step`, with its shardings and donation) for the config's
mesh without allocating a single array: the state comes from
:func:`research.train_state.abstract_train_state` (``ShapeDtypeStruct``s with shardings) and
the batch is abstract too. The devices are whatever JAX has; ``launch.plan`` fakes N
CPU devices, so a 256- or 1024-device mesh can be planned on a laptop.

What it reports, per device (the SPMD program every device runs):

* state memory from the shardings: parameters, optimizer state, gradients (one per
  trainable parameter, in the parameter dtype), and their sum as the analytic
  estimate ``params + grads + optimizer``;
* the compiler's buffer assignment (``compiled.memory_analysis()``): arguments,
  outputs, aliased (donated) bytes, temporaries, and the peak
  ``arguments + outputs - aliased + temporaries``; activations and work buffers are the
  temporaries minus the gradients;
* the same peak for a *floor* batch (one 16-token sequence per batch shard), i.e. what
  the state costs once activations are negligible, compared with the analytic state
  floor: params + grads + optimizer + the transient buffers a step needs besides them
  (one layer all-gathered with its full gradient under FSDP, or one gradient-sized
  update buffer, whichever is larger; plus the accumulator with gradient
  accumulation). Measured on CPU: +0.5% for Llama-7B on 256 devices, -2.1% for 7B on
  8 with accumulation, 0 to -3% for small DP/FSDP/TP meshes, +16.7% for 70B on
  fsdp=128 x tensor=8 with accumulation (README "Scaling");
* FLOPs per step: matmul FLOPs counted in the optimised HLO with each loop body
  multiplied by its trip count (XLA's own ``cost_analysis()`` counts a scanned layer
  stack once; it is shown too), against the PaLM formula ``6N + 12 L d T`` per token;
* collectives in the HLO (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute): static count, executions per step and bytes per step.

Memory is for the backend that compiled it (CPU when faked): fusion and buffer reuse
differ on GPU/TPU, so treat the figures as estimates with a margin (see README).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from research import metrics as metrics_lib
from research import recipe
from research import sharding as shd
from research import step as step_lib
from research.config import ConfigError
from research.models.transformer import count_params, resolved_dims
from research.train_state import abstract_train_state
from research.validation import check_batch_divisibility, check_tensor_divisibility

GiB = 1024 ** 3
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
               'collective-permute')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
          'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
          'c64': 8, 'c128': 16, 's4': 1, 'u4': 1}


class PlanError(ConfigError):
  """The config cannot be planned or does not fit the device memory (one line)."""


# --------------------------------------------------------------------------- HLO text


@dataclasses.dataclass
class _Comp:
  dot_flops: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)  # op -> [count, bytes]
  calls: list = dataclasses.field(default_factory=list)  # (callee, multiplier or cond name)
  loop_bound: int | None = None  # A loop condition's `i < N`: N.


def _shape_dims(type_str: str) -> list[tuple[str, list[int]]]:
  """``'(f32[2,3]{1,0}, bf16[4])'`` -> ``[('f32', [2, 3]), ('bf16', [4])]``."""
  return [(dt, [int(d) for d in dims.split(',') if d.strip()])
          for dt, dims in re.findall(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,\s]*)\]', type_str)]


def _type_bytes(type_str: str) -> int:
  return sum(_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in _shape_dims(type_str))


def _split_instruction(line: str):
  """``%x = TYPE op(operands), attrs`` -> (name, type, op, operands, attrs) or None."""
  m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*', line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith('('):  # Tuple type: balanced parentheses.
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        break
    type_str, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_str, _, rest = rest.partition(' ')
  m2 = re.match(r'([\w\-]+)\(', rest)
  if not m2:
    return None
  op = m2.group(1)
  depth, start = 0, m2.end() - 1
  for j in range(start, len(rest)):
    depth += rest[j] == '('
    depth -= rest[j] == ')'
    if depth == 0:
      break
  return m.group(1), type_str, op, rest[start + 1:j], rest[j + 1:]


def analyze_hlo(text: str) -> dict[str, Any]:
  """Matmul FLOPs and collectives of an optimised HLO module, loops x trip counts."""
  comps: dict[str, _Comp] = {}
  entry = None
  current: _Comp | None = None
  symbols: dict[str, str] = {}
  unknown_trip = 0
  for line in text.splitlines():
    header = (re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$', line)
              or re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\{\s*$', line))
    if header:
      current = comps.setdefault(header.group(2), _Comp())
      symbols = {}
      if header.group(1):
        entry = header.group(2)
      continue
    if current is None or line.strip() in ('', '}'):
      continue
    parsed = _split_instruction(line)
    if parsed is None:
      continue
    name, type_str, op, operands, attrs = parsed
    symbols[name] = type_str
    if op == 'constant' and re.match(r's32\[\]', type_str):
      consts = symbols.setdefault('__s32_constants__', {})
      consts[name] = int(re.match(r'\s*(-?\d+)', operands).group(1)) if re.match(
          r'\s*-?\d+', operands) else None
    if op == 'compare' and 'direction=LT' in attrs:
      rhs = operands.split(',')[-1].strip().split()[-1].lstrip('%')
      bound = symbols.get('__s32_constants__', {}).get(rhs)
      if bound is not None:
        current.loop_bound = bound
    if op == 'convolution':
      # The TPU compiler writes matmuls as convolutions: 2 x output elements x the
      # contraction (kernel input features x kernel window positions that meet real,
      # not dilation-inserted, input elements).
      out = _shape_dims(type_str)
      names = [o.strip().split()[-1].lstrip('%') for o in operands.split(',')[:2]]
      rhs = _shape_dims(symbols.get(names[1], '')) if len(names) == 2 else []
      labels = re.search(r'dim_labels=\w+_(\w+)->', attrs)
      if out and rhs and labels:
        rdims, rlab = rhs[0][1], labels.group(1)
        dil = re.search(r'lhs_dilate=([\dx]+)', attrs)
        dilate = [int(v) for v in dil.group(1).split('x')] if dil else []
        k = 1
        for pos, ch in enumerate(rlab):
          if pos >= len(rdims):
            break
          if ch == 'i':
            k *= rdims[pos]
          elif ch.isdigit():
            d = dilate[int(ch)] if int(ch) < len(dilate) else 1
            k *= -(-rdims[pos] // d)
        current.dot_flops += 2.0 * math.prod(out[0][1]) * k
    if op == 'dot':
      out = _shape_dims(type_str)
      lhs_name = operands.split(',')[0].strip()
      inline = _shape_dims(lhs_name)
      lhs = inline[0][1] if inline else None
      if lhs is None:
        ref = lhs_name.split()[-1].lstrip('%')
        lhs_types = _shape_dims(symbols.get(ref, ''))
        lhs = lhs_types[0][1] if lhs_types else None
      cdims = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs)
      if out and lhs is not None:
        k = math.prod(lhs[int(d)] for d in cdims.group(1).split(',') if d) if cdims else 1
        current.dot_flops += 2.0 * math.prod(out[0][1]) * k
    base = op[:-6] if op.endswith('-start') else op
    if base in COLLECTIVES and not op.endswith('-done'):
      size = _type_bytes(type_str)
      if op.endswith('-start') and type_str.startswith('('):
        parts = _shape_dims(type_str)  # (operands..., outputs...): count the outputs.
        # collective-permute-start also carries two u32[] context scalars: not data.
        parts = [p for p in parts if len(p[1]) or p[0] not in ('u32', 's32')] or parts
        size = sum(_BYTES.get(dt, 4) * math.prod(d) for dt, d in parts[len(parts) // 2:])
      entry_ = current.collectives.setdefault(base, [0, 0])
      entry_[0] += 1
      entry_[1] += size
    if op == 'while':
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
      body = re.search(r'body=%?([\w.\-]+)', attrs)
      cond = re.search(r'condition=%?([\w.\-]+)', attrs)
      if body:
        # No known_trip_count (the TPU compiler's HLO): the condition's `i < N`.
        mult = int(trip.group(1)) if trip else ('cond', cond.group(1) if cond else '')
        current.calls.append((body.group(1), mult))
    else:
      for key in ('calls', 'to_apply', 'true_computation', 'false_computation'):
        for callee in re.findall(rf'\b{key}=%?([\w.\-]+)', attrs):
          current.calls.append((callee, 1))
      branches = re.search(r'branch_computations=\{([^}]*)\}', attrs)
      if branches:
        for callee in branches.group(1).split(','):
          current.calls.append((callee.strip().lstrip('%'), 1))

  memo: dict[str, tuple[float, dict]] = {}
  unknown = [unknown_trip]

  def total(name: str, stack=()) -> tuple[float, dict]:
    if name in memo:
      return memo[name]
    comp = comps.get(name)
    if comp is None or name in stack:
      return 0.0, {}
    flops = comp.dot_flops
    coll = {k: {'count': v[0], 'per_step': v[0], 'bytes_per_step': v[1]}
            for k, v in comp.collectives.items()}
    for callee, mult in comp.calls:
      if isinstance(mult, tuple):
        cond = comps.get(mult[1])
        mult = cond.loop_bound if cond is not None and cond.loop_bound else None
        if mult is None:
          unknown[0] += 1
          mult = 1
      f, c = total(callee, stack + (name,))
      flops += mult * f
      for k, v in c.items():
        agg = coll.setdefault(k, {'count': 0, 'per_step': 0, 'bytes_per_step': 0})
        agg['count'] += v['count']
        agg['per_step'] += mult * v['per_step']
        agg['bytes_per_step'] += mult * v['bytes_per_step']
    memo[name] = (flops, coll)
    return memo[name]

  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  flops, coll = total(entry)
  return {'dot_flops': flops, 'collectives': coll, 'loops_with_unknown_trip_count': unknown[0],
          'dot_flops_loop_bodies_once': _once_flops(comps, entry)}


def _once_flops(comps: dict[str, '_Comp'], entry: str) -> float:
  """Matmul FLOPs with every loop body counted once (what cost_analysis() counts)."""
  memo: dict[str, float] = {}

  def total(name: str, stack=()) -> float:
    if name in memo:
      return memo[name]
    comp = comps.get(name)
    if comp is None or name in stack:
      return 0.0
    memo[name] = comp.dot_flops + sum(total(c, stack + (name,)) for c, _ in comp.calls)
    return memo[name]

  return total(entry)


# --------------------------------------------------------------------------- planning


def fsdp_working_set(params, mesh: jax.sharding.Mesh) -> tuple[int, str]:
  """Bytes of one layer's weights all-gathered over 'fsdp' plus its full gradient.

  FSDP keeps every weight split, but the layer being computed needs its whole weights
  (all-gathered) and produces its whole gradient before the reduce-scatter: 2 x the
  largest layer, unsplit on the fsdp axis (still split on the others). A layer is one
  slice of the scanned stack (leading 'layers' axis), one ``blocks/<i>`` of an
  unscanned model, or any other single weight (the embedding). 0 without FSDP.
  Returns (bytes, name of the largest layer).
  """
  if mesh.shape.get('fsdp', 1) == 1:
    return 0, ''
  groups: dict[str, int] = {}
  for path, var in nnx.to_flat_state(params):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    names = shd.logical_names(var) or ()
    sharding = value.sharding
    spec = [tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if a != 'fsdp') or None
            for e in sharding.spec]
    shape = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)).shard_shape(
        tuple(value.shape))
    parts = [str(p) for p in path]
    if names and names[0] == 'layers':
      key, shape = 'one scanned layer', shape[1:]
    else:
      idx = next((i for i, p in enumerate(path) if isinstance(p, int)), None)
      key = '/'.join(parts[:idx + 1]) if idx is not None else '/'.join(parts)
    groups[key] = groups.get(key, 0) + math.prod(shape) * jnp.dtype(value.dtype).itemsize
  key = max(groups, key=groups.get)
  return 2 * groups[key], key


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, seq_len: int,
                   sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The language-model batch the trainer feeds the step, as ShapeDtypeStructs."""
  shape = (batch_size, seq_len)
  batch = {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
           'targets': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
           'mask': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}
  if config.data.document_masking:  # Packed documents: research/data/pipeline.py.
    for key in ('segment_ids', 'positions'):
      batch[key] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
  return batch


def resolve_vocab(config: ml_collections.ConfigDict) -> None:
  """model.vocab_size=0 means 'the tokenizer's': take it from data.* without training one."""
  if config.model.vocab_size == 0:
    if config.data.tokenizer == 'sentencepiece':
      config.model.vocab_size = int(config.data.spm_vocab_size)
    else:
      from research.data.tokenizers import ByteTokenizer
      config.model.vocab_size = ByteTokenizer().vocab_size


def param_count_estimate(m: ml_collections.ConfigDict) -> int:
  """Parameters of the decoder LM from its shapes (no model built)."""
  from research.models.transformer import padded_vocab_size
  dims = resolved_dims(m)
  d, h, f = m.d_model, dims['head_dim'], dims['mlp_dim']
  attn = d * h * (m.num_heads * 2 + dims['num_kv_heads'] * 2)
  mlp = d * f * (3 if m.mlp_kind == 'swiglu' else 2)
  vocab = padded_vocab_size(m.vocab_size) * d * (1 if m.tie_embeddings else 2)
  return m.num_layers * (attn + mlp + 2 * d) + vocab + d


def model_flops_per_step(config: ml_collections.ConfigDict) -> float:
  """PaLM's 6N + 12 L d T per token, times the tokens of one step."""
  from research.models.transformer import padded_vocab_size
  m = config.model
  dims = resolved_dims(m)
  n = param_count_estimate(m) - padded_vocab_size(m.vocab_size) * m.d_model * (
      1 if m.tie_embeddings else 2) - m.d_model
  per_token = metrics_lib.model_flops_per_token(n, m.num_layers, m.num_heads * dims['head_dim'],
                                                config.seq_len)
  return per_token * config.batch_size * config.seq_len


def analytic_memory(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> dict[str, float]:
  """Bytes per device of a train step, written down from the shapes (no compiler).

  State: parameters and gradients in ``param_dtype`` and Adam's two moments in float32
  (other optimizers: the same two-moment size, an upper bound), split over
  ``fsdp x tensor`` (norms replicated: negligible).

  Activations, per device, for a micro-batch of ``b = batch / (data*fsdp*accum)``
  sequences of ``L`` tokens, compute dtype of ``a`` bytes, ``t`` tensor shards:

  * saved for the backward pass, per layer, by ``model.remat``: ``full`` keeps the
    block input ``b L D``; ``dots_with_no_batch_dims_saveable`` also the projection
    outputs (q, k, v, attention out, MLP in/out: ``b L (3D + (N+2K)H/t + kF/t)``,
    k = 2 for SwiGLU); ``dots_saveable`` also the attention scores (float32
    ``b N/t L^2``) and values; ``none`` everything of the block (with the
    softmax probabilities in the compute dtype);
  * one layer being differentiated: its attention scores and their gradient, both
    float32, ``b N/t L^2 (4 + 4)`` (the compute-dtype probabilities are fused into
    the matmuls that consume them: seen in the TPU compiler's peaks, 7B/v5p-256 and
    70B/v5p-1024, README "Scaling"), plus its MLP hidden activations and gradients
    ``4 b L kF/t a`` (recomputed first when not saved);
  * the output layer: logits in the compute dtype, their float32 copy and the
    float32 gradient, ``b L V/t (a + 4 + 4)`` (a ``loss.chunk_size`` of C tokens
    replaces L by C). Not live together with the layer being differentiated: the
    loss's forward and backward finish before the backward scan over the layers
    starts, so the peak holds the larger of the two (the TPU compiler's buffer
    assignment gives them overlapping offsets: 7B/v5p-256; compared with its
    ``peak_memory_in_bytes``, README "TPU plans");
  * FSDP: one layer's weights gathered and its gradient before the reduce-scatter
    (2 x one layer, in the parameter dtype); gradient accumulation: one more
    gradient-sized buffer.
  * pipeline (``mesh.stage`` > 1): the blocks' state split over the stages, the saved
    activations of ``num_layers / stage`` layers over the schedule's iterations
    (research/models/pipeline.py), plus its micro-batch buffers.
  """
  from research.models.transformer import padded_vocab_size
  m = config.model
  dims = resolved_dims(m)
  data, fsdp, t = mesh.get('data', 1), mesh.get('fsdp', 1), mesh.get('tensor', 1)
  seq = mesh.get('sequence', 1)
  k_acc = config.optimizer.grad_accum_steps
  a = 2 if m.dtype in ('bfloat16', 'float16') else 4
  pb = 2 if m.param_dtype in ('bfloat16', 'float16') else 4
  n_params = param_count_estimate(m)
  state_shards = fsdp * t
  vocab_params = padded_vocab_size(m.vocab_size) * m.d_model * (1 if m.tie_embeddings else 2)
  stage = mesh.get('stage', 1)
  n_held = n_params  # Pipeline: each stage holds num_layers / stage of the blocks.
  if stage > 1:
    n_held = (n_params - vocab_params) / stage + vocab_params
  params = n_held * pb / state_shards
  grads = params
  optimizer = 2 * n_held * 4 / state_shards if config.optimizer.name != 'sgd' else 0.0
  b = config.batch_size / (data * fsdp * k_acc)
  L = config.seq_len / seq
  D, H = m.d_model, dims['head_dim']
  N = m.num_heads / t
  K = dims['num_kv_heads'] / t if dims['num_kv_heads'] % t == 0 else dims['num_kv_heads']
  F = dims['mlp_dim'] / t
  kf = 2 if m.mlp_kind == 'swiglu' else 1
  V = padded_vocab_size(m.vocab_size) / t
  tok = b * L
  scores = b * N * config.seq_len * L  # Keys are never split (sequence shards gather them).
  per_layer = {
      'full': tok * D * a,
      'dots_with_no_batch_dims_saveable': tok * a * (3 * D + (N + 2 * K) * H + kf * F),
  }
  per_layer['dots_saveable'] = per_layer['dots_with_no_batch_dims_saveable'] + scores * 4 + tok * N * H * a
  per_layer['none'] = per_layer['dots_saveable'] + scores * a + tok * a * (2 * D + (N + K) * H + (kf + 1) * F)
  saved = m.num_layers * per_layer.get(m.remat, per_layer['none'])
  layer_attention = scores * (4 + 4)
  layer_mlp = 4 * tok * kf * F * a
  pipeline_buffers = 0.0
  if stage > 1:
    # research/models/pipeline.py: a stage saves its num_layers/stage layers' inputs
    # (at least: 'none' acts as 'full') for each of its R*M + S - 1 iterations of b/M
    # sequences; one micro-batch's layer is differentiated at a time; the input, output
    # (and circular) buffers hold b sequences each.
    from research.models import pipeline as pipeline_lib
    sch = pipeline_lib.resolve_config(m, stage)
    policy = 'full' if m.remat == 'none' else m.remat
    saved = (m.num_layers / stage) * (1 + (stage - 1) / (sch.repeats * sch.microbatches)) * (
        per_layer.get(policy, per_layer['full']))
    layer_attention /= sch.microbatches
    layer_mlp /= sch.microbatches
    pipeline_buffers = tok * D * a * (3 if sch.repeats > 1 and sch.microbatches > stage else 2)
  chunk = config.loss.chunk_size if config.loss.chunk_size and config.seq_len % config.loss.chunk_size == 0 else config.seq_len
  output = b * min(chunk, L) * V * (a + 4 + 4)
  layer_weights = (n_params - vocab_params) / m.num_layers
  largest = max(layer_weights, padded_vocab_size(m.vocab_size) * D)  # A layer, or the embedding.
  fsdp_gather = 2 * largest * pb / t if fsdp > 1 else 0.0
  accumulator = grads if k_acc > 1 else 0.0
  state = params + grads + optimizer
  activations = saved + max(layer_attention + layer_mlp, output) + pipeline_buffers
  total = state + activations + fsdp_gather + accumulator
  return {'params': params, 'grads': grads, 'optimizer': optimizer, 'state': state,
          'saved_per_layer': per_layer.get(m.remat, per_layer['none']), 'saved': saved,
          'layer_attention': layer_attention, 'layer_mlp': layer_mlp, 'output_layer': output,
          'fsdp_gather': fsdp_gather, 'accumulator': accumulator,
          'activations': activations, 'total': total}


def resolve_memory_fraction(memory_fraction: float | None) -> float:
  """The GPU memory share a run gets (research/gpu_env.py): explicit, env, or default."""
  if memory_fraction is not None:
    if not 0.0 < memory_fraction <= 1.0:
      raise PlanError(f'--memory_fraction={memory_fraction} must be in (0, 1].')
    return float(memory_fraction)
  from research import gpu_env
  return gpu_env.memory_fraction()


def _compile_step(config, mesh, rules, ts, task, batch_size, seq_len):
  batch_sharding = step_lib.batch_sharding(mesh, config)
  step = step_lib.make_train_step(config, task, ts, batch_sharding)
  batch = abstract_batch(config, batch_size, seq_len, batch_sharding)
  with shd.use_mesh(mesh, rules):
    t0 = time.perf_counter()
    lowered = step.lower(ts.state, batch)
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is translated.
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      line = next((l for l in str(e).splitlines() if 'memory' in l.lower()), str(e))
      err = PlanError(f'{config.name} does not fit: the compiler refuses it: {line.strip()[:300]}')
      err.compile_s = time.perf_counter() - t1
      raise err from None
    t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  m = {k: int(getattr(mem, k, 0) or 0) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
      'temp_size_in_bytes', 'generated_code_size_in_bytes')}
  m['args_out_temp_bytes'] = (m['argument_size_in_bytes'] + m['output_size_in_bytes']
                              - m['alias_size_in_bytes'] + m['temp_size_in_bytes'])
  # The TPU compiler's temp_size overstates what its buffer assignment allocates (70B:
  # 64.5 GiB temp vs 52.7 GiB of preallocated temp); its own out-of-memory check uses
  # peak_memory_in_bytes (README "Which compiled figure is the peak"). XLA:CPU's
  # temp_size is the buffer assignment, so the CPU path keeps args + out - alias + temp.
  peak = int(getattr(mem, 'peak_memory_in_bytes', 0) or 0)
  tpu = mesh.devices.flat[0].platform == 'tpu'
  m['peak_source'] = 'peak_memory_in_bytes' if tpu and peak else 'args+out-alias+temp'
  m['peak_bytes'] = peak if tpu and peak else m['args_out_temp_bytes']
  return compiled, m, {'lower_s': t1 - t0, 'compile_s': t2 - t1}, lowered


def check_fits(report: dict[str, Any], device_memory_gb: float) -> None:
  """Raises :class:`PlanError` (one line, carrying ``.report``) when the plan does not fit.

  Before compiling the need is the analytic state floor; after, the compiled peak.
  Sets ``report['fits']``.
  """
  mem = report['memory_per_device']
  if report.get('compiled'):
    need, what = mem['compiled']['peak_bytes'], 'the compiled train step'
  else:
    need, what = mem['analytic_floor'], 'the state alone (analytic, before compiling)'
  report['device_memory_gb'] = device_memory_gb
  fraction = report.get('memory_fraction') or 1.0
  report['fits'] = need <= device_memory_gb * fraction * GiB
  if report['fits']:
    return
  if report.get('compiled'):
    fix = ('more devices or fsdp/tensor shards, a smaller batch_size per step (more '
           'optimizer.grad_accum_steps), or model.remat')
  else:
    fix = 'more devices or fsdp/tensor shards (the state is split fsdp*tensor ways)'
  err = PlanError(
      f'{report["config_name"]} does not fit: {what} needs {need / GiB:.1f} GiB per device '
      f'on mesh {_mesh_str(report["mesh"])} ({report["devices"]} devices) but '
      f'--device_memory_gb={device_memory_gb:g}'
      + (f' x memory fraction {fraction:g}' if fraction != 1.0 else '')
      + f' (params {mem["params"] / GiB:.1f} + grads '
      f'{mem["grads"] / GiB:.1f} + optimizer {mem["optimizer"] / GiB:.1f} GiB); use {fix}.')
  err.report = report
  raise err


def plan(config: ml_collections.ConfigDict, *, device_memory_gb: float | None = None,
         floor: bool = True, devices: list[Any] | None = None,
         topology: Any = None, memory_fraction: float | None = None) -> dict[str, Any]:
  """Compiles the train step of ``config`` on its mesh over ``jax.devices()``; a report.

  With ``device_memory_gb``, raises :class:`PlanError` (carrying the report as
  ``.report``) when the analytic state alone exceeds it (before compiling), or when
  the compiled peak per device does.
  """
  t_start = time.perf_counter()
  # The run's composed task (fine-tuning, QAT, pruning...), its sources read, not trained.
  config, task, _ = recipe.compose(config, build_tokenizer=False)
  if topology is not None and devices is None:
    from research import topology as topology_lib
    devices = topology_lib.devices(topology)
  devices = list(devices if devices is not None else jax.devices())
  mesh = shd.mesh_from_config(config.mesh, devices=devices)
  rules = shd.rules_from_config(config.mesh)
  n_dev = mesh.devices.size
  processes = len({d.process_index for d in devices})
  platform = devices[0].platform
  chip = None
  if platform == 'tpu':
    from research import topology as topology_lib
    chip = topology.chip if topology is not None else topology_lib.chip_for_device_kind(
        devices[0].device_kind)
    if device_memory_gb is None and chip is not None:
      device_memory_gb = chip.hbm_bytes / GiB
    fraction = 1.0  # The TPU compiler's HBM figure is what a program may use.
  else:
    # CPU devices stand in for GPUs: a GPU run gets its memory fraction (gpu_env).
    fraction = resolve_memory_fraction(memory_fraction)
  check_batch_divisibility(config, dict(mesh.shape), processes)
  check_tensor_divisibility(config.model, mesh.shape['tensor'])
  t0 = time.perf_counter()
  ts = abstract_train_state(config, mesh, task)
  abstract_s = time.perf_counter() - t0

  model_state, opt_state = ts.state[0], ts.state[1]
  model, _ = nnx.merge(ts.graphdef, ts.state)
  counts = count_params(model)
  params = nnx.state(model, nnx.Param)
  trainable = nnx.state(model, task.trainable)
  del model
  mem = {
      'params': shd.per_device_bytes(params),
      'optimizer': shd.per_device_bytes(opt_state),
      'grads': shd.per_device_bytes(trainable),
  }
  mem['other_state'] = shd.per_device_bytes(model_state) - mem['params']
  mem['params_grads_optimizer'] = mem['params'] + mem['grads'] + mem['optimizer']
  mem['fsdp_gather'], mem['fsdp_largest_layer'] = fsdp_working_set(params, mesh)
  # Besides the state, a step holds either one layer all-gathered (FSDP, inside the
  # layer loop) or one gradient-sized buffer (the clipped gradient / Adam update, after
  # the loop), whichever is larger; they are not live at the same time. Gradient
  # accumulation adds the accumulator (one more gradient-sized buffer).
  mem['transient'] = max(mem['fsdp_gather'], mem['grads'])
  if config.optimizer.grad_accum_steps > 1:
    mem['transient'] += mem['grads']
  mem['analytic_floor'] = mem['params_grads_optimizer'] + mem['transient']

  dims = resolved_dims(config.model)
  tokens = config.batch_size * config.seq_len
  per_token = metrics_lib.model_flops_per_token(
      counts['non_embedding'], config.model.num_layers,
      config.model.num_heads * dims['head_dim'], config.seq_len)
  report = {
      'config_name': config.name,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      'devices': n_dev,
      'device_kind': devices[0].device_kind,
      'param_count': counts['total'], 'param_count_non_embedding': counts['non_embedding'],
      'batch_size': config.batch_size, 'seq_len': config.seq_len, 'tokens_per_step': tokens,
      'grad_accum_steps': config.optimizer.grad_accum_steps,
      'dtype': config.model.dtype, 'param_dtype': config.model.param_dtype,
      'remat': config.model.remat, 'optimizer': config.optimizer.name,
      'memory_per_device': mem,
      'floor': None,
      'flops': {'model_flops_per_step_6N': per_token * tokens},
      'collectives': {},
      'timing_s': {'abstract_state': abstract_s},
      'device_memory_gb': device_memory_gb,
      'memory_fraction': fraction,
      'platform': platform,
      'topology': topology.describe() if topology is not None else None,
      'compiled': False,
      'cannot_know': _cannot_know(platform, config),
  }
  mem['analytic'] = analytic_memory(config, dict(mesh.shape))
  if device_memory_gb is not None:
    report['timing_s']['total'] = time.perf_counter() - t_start
    check_fits(report, device_memory_gb)  # Refuses before compiling if the state can't fit.

  try:
    compiled, cmem, times, lowered = _compile_step(config, mesh, rules, ts, task,
                                                   config.batch_size, config.seq_len)
  except PlanError as e:
    report['fits'] = False
    report['timing_s']['compile_s'] = getattr(e, 'compile_s', None)
    report['timing_s']['total'] = time.perf_counter() - t_start
    e.report = report
    raise
  hlo = analyze_hlo(compiled.as_text())
  # FLOPs from the lowered (pre-optimisation, global) module: the TPU compiler's
  # optimised HLO writes matmuls as windowed convolutions that cannot be counted
  # reliably; the lowered one has plain dots and the scan loops with their bounds.
  glob = analyze_hlo(lowered.as_text(dialect='hlo'))
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  batch_bytes = shd.per_device_bytes(abstract_batch(
      config, config.batch_size, config.seq_len, shd.named(mesh, ('batch', 'seq'), rules)))
  cmem['state_arguments'] = cmem['argument_size_in_bytes'] - batch_bytes
  cmem['activations_and_workspace'] = max(cmem['temp_size_in_bytes'] - mem['grads'], 0)
  mem['compiled'] = cmem
  mem['compiled_state_vs_analytic'] = (
      cmem['state_arguments'] / (mem['params'] + mem['optimizer'] + mem['other_state']) - 1.0)
  report['compiled'] = True
  report['flops'].update({
      'hlo_matmul_flops_per_device': glob['dot_flops'] / n_dev,
      'hlo_matmul_flops_per_step': glob['dot_flops'],
      'xla_cost_analysis_flops_per_device': float(cost.get('flops', 0.0)),
      'loops_with_unknown_trip_count': (glob['loops_with_unknown_trip_count']
                                        + hlo['loops_with_unknown_trip_count']),
  })
  report['collectives'] = hlo['collectives']
  report['timing_s'].update(times)
  report['time_estimate'] = time_estimate(report, cost, glob, platform, chip)
  an = mem['analytic']
  mem['analytic_vs_compiled'] = an['total'] / max(cmem['peak_bytes'], 1) - 1.0

  if floor:
    shards = shd.batch_shards(dict(mesh.shape)) * config.optimizer.grad_accum_steps
    if mesh.shape.get('stage', 1) > 1:  # Each shard's rows split into the micro-batches.
      from research.models import pipeline as pipeline_lib
      shards *= pipeline_lib.resolve_config(config.model, mesh.shape['stage']).microbatches
    floor_seq = min(config.seq_len, max(16, mesh.shape['sequence']))
    _, fmem, ftimes, _ = _compile_step(config, mesh, rules, ts, task, shards, floor_seq)
    report['floor'] = {
        'batch_size': shards, 'seq_len': floor_seq, 'peak_bytes': fmem['peak_bytes'],
        'memory': fmem,
        'vs_analytic_floor': fmem['peak_bytes'] / mem['analytic_floor'] - 1.0,
        'vs_params_grads_optimizer': fmem['peak_bytes'] / mem['params_grads_optimizer'] - 1.0,
    }
    report['timing_s']['floor_compile_s'] = ftimes['compile_s']
  report['timing_s'].pop('total', None)
  report['timing_s']['total'] = time.perf_counter() - t_start

  if device_memory_gb is not None:
    check_fits(report, device_memory_gb)
  return report


def time_estimate(report: dict[str, Any], cost: dict[str, Any], glob: dict[str, Any],
                  platform: str, chip) -> dict[str, Any]:
  """Step time from the compiler's estimate, corrected for loops, with the collectives.

  ``cost_analysis()['optimal_seconds']`` (the TPU compiler's roofline estimate of the
  program) counts each loop body once, like its FLOPs: measured with libtpu 0.0.42.1,
  a 16-step scan of a matmul reports the same seconds as a 1-step one. The
  correction multiplies it by (matmul FLOPs with trip counts / matmul FLOPs with each
  body once) from the lowered module. Collective time is the bytes each device
  moves per step over the chip's ICI bandwidth; the step time takes the two as
  overlapped (the latency-hiding scheduler's goal): ``max(compute, collectives)``.
  Without a compiler estimate (the CPU compiler has none) the compute time is the
  matmul FLOPs at the target's peak.
  """
  n = report['devices']
  once = glob.get('dot_flops_loop_bodies_once') or 0.0
  loop_factor = glob['dot_flops'] / once if once else 1.0
  optimal = cost.get('optimal_seconds')
  peak = chip.peak_bf16_flops if chip is not None else 989e12
  link = chip.ici_bw if chip is not None else 450e9
  if optimal is not None and optimal > 0:
    compute, source = float(optimal) * loop_factor, 'compiler optimal_seconds x loop trip counts'
  else:
    compute = glob['dot_flops'] / n / peak
    source = f'matmul FLOPs at {peak / 1e12:.0f} TFLOP/s ({"chip" if chip else "H100/H200 bf16"} peak)'
  coll_bytes = sum(v['bytes_per_step'] for v in report['collectives'].values())
  collective = coll_bytes / link
  step = max(compute, collective)
  tokens = report['tokens_per_step']
  return {'compiler_optimal_seconds': None if optimal is None else float(optimal),
          'loop_factor': loop_factor, 'compute_s': compute, 'compute_source': source,
          'collective_bytes_per_device': coll_bytes, 'collective_s': collective,
          'link_bytes_per_s': link, 'step_s': step,
          'tokens_per_s_per_device': tokens / step / n if step else 0.0,
          'mfu': report['flops']['model_flops_per_step_6N'] / (step * n * peak) if step else 0.0,
          'peak_flops_per_device': peak}


def _cannot_know(platform: str, config: ml_collections.ConfigDict) -> list[str]:
  """What a plan compiled by this backend cannot tell about the target accelerator."""
  if platform == 'tpu':
    return ['compiled by the TPU compiler for compile-only devices: memory and time are '
            "the compiler's figures; nothing ran (no measured step time, no host/input "
            'pipeline cost)']
  notes = ['the CPU compiler stands in for the GPU one: fusion, buffer reuse and the '
           'collective algorithms differ on GPU (treat memory as an estimate)',
           'no compiler time estimate on CPU: compute time is the matmul FLOPs at the '
           'H100/H200 peak',
           'GPU memory: a run can use device memory x its memory fraction '
           '(XLA_PYTHON_CLIENT_MEM_FRACTION; research/gpu_env.py), not all of it']
  if config.model.dtype in ('bfloat16', 'float16'):
    notes.insert(1, 'the CPU compiler keeps bfloat16 activations at float32 size: compiled '
                    'activations overstate a GPU run by up to 2x (see the analytic estimate)')
  if config.model.attention_impl == 'cudnn':
    notes.append('cuDNN attention is a GPU custom call: the CPU plan uses XLA attention, '
                 'which holds the [B, N, L, L] scores cuDNN never materialises')
  return notes


# --------------------------------------------------------------------------- output


def _mesh_str(mesh: dict[str, int]) -> str:
  return ' x '.join(f'{k}={v}' for k, v in mesh.items() if v > 1 or k in ('data', 'fsdp', 'tensor'))


def _gib(b: float) -> str:
  """Bytes in GiB, or MiB/KiB for small plans (smoke configs)."""
  for unit, scale in (('GiB', GiB), ('MiB', 1024 ** 2), ('KiB', 1024)):
    if abs(b) >= scale or unit == 'KiB':
      return f'{b / scale:8.2f} {unit}'


def format_report(r: dict[str, Any]) -> str:
  """The human-readable plan (what ``launch.plan`` prints)."""
  m = r['memory_per_device']
  f = r['flops']
  lines = [
      f"plan: {r['config_name']}  {r['param_count'] / 1e9:.2f}B params "
      f"({r['param_count_non_embedding'] / 1e9:.2f}B non-embedding)",
      f"mesh: {_mesh_str(r['mesh'])} = {r['devices']} devices ({r['device_kind']})"
      + (f" on {r['topology']}" if r.get('topology') else ''),
      f"step: batch {r['batch_size']} x seq {r['seq_len']} = {r['tokens_per_step']:,} tokens"
      f" (grad_accum {r['grad_accum_steps']}); dtype {r['dtype']}, params {r['param_dtype']},"
      f" remat {r['remat']}, {r['optimizer']}",
      'memory per device (analytic, from the shardings):',
      f"  parameters                  {_gib(m['params'])}",
      f"  optimizer state             {_gib(m['optimizer'])}",
      f"  gradients                   {_gib(m['grads'])}",
      f"  = params+grads+optimizer    {_gib(m['params_grads_optimizer'])}",
      f"  + transient                 {_gib(m['transient'])}   (max of: FSDP gather of "
      f"{m['fsdp_largest_layer'] or '-'} x2 = {_gib(m['fsdp_gather']).strip()}; "
      f"one gradient-sized update buffer{'; + accumulator' if r['grad_accum_steps'] > 1 else ''})",
      f"  = state floor               {_gib(m['analytic_floor'])}",
  ]
  if r.get('compiled'):
    c = m['compiled']
    lines += [
        'memory per device (compiled: memory_analysis()):',
        f"  state arguments             {_gib(c['state_arguments'])}   "
        f"(params+optimizer analytic {100 * m['compiled_state_vs_analytic']:+.2f}%)",
        f"  temporaries                 {_gib(c['temp_size_in_bytes'])}   "
        f"(gradients + activations + work buffers)",
        f"  activations + workspace     {_gib(c['activations_and_workspace'])}   "
        f"(temporaries - gradients)",
        f"  args+out-alias+temp         {_gib(c['args_out_temp_bytes'])}",
        f"  PEAK ({c.get('peak_source', 'args+out-alias+temp')})".ljust(30)
        + f"{_gib(c['peak_bytes'])}",
    ]
    if r.get('floor'):
      fl = r['floor']
      lines.append(
          f"  floor peak (batch {fl['batch_size']} x seq {fl['seq_len']}) "
          f"{_gib(fl['peak_bytes']).strip()}: state floor {100 * fl['vs_analytic_floor']:+.1f}%,"
          f" params+grads+optimizer {100 * fl['vs_params_grads_optimizer']:+.1f}%")
  an = m.get('analytic')
  if an:
    lines += [
        'memory per device (analytic estimate: shapes x dtypes x shards, remat policy):',
        f"  params + grads + optimizer  {_gib(an['state'])}",
        f"  saved activations           {_gib(an['saved'])}   ({r['remat']}: "
        f"{_gib(an['saved_per_layer']).strip()} per layer)",
        f"  one layer's backward        {_gib(an['layer_attention'] + an['layer_mlp'])}   "
        f"(attention scores/probs and grads; MLP)",
        f"  output layer                {_gib(an['output_layer'])}   (logits, float32 copy, "
        f"grad; the larger of these two counts)",
        f"  FSDP gather + accumulator   {_gib(an['fsdp_gather'] + an['accumulator'])}",
        f"  = TOTAL                     {_gib(an['total'])}"
        + (f"   ({100 * m['analytic_vs_compiled']:+.1f}% vs the compiled peak)"
           if 'analytic_vs_compiled' in m else ''),
    ]
  if r.get('device_memory_gb') is not None:
    frac = r.get('memory_fraction') or 1.0
    usable = f" x {frac:g} = {r['device_memory_gb'] * frac:.1f} GiB usable" if frac != 1.0 else ''
    lines.append(f"  fits in {r['device_memory_gb']:g} GiB{usable}: "
                 f"{'yes' if r.get('fits') else 'NO'}")
  if r.get('compiled'):
    lines += [
        'FLOPs per step:',
        f"  HLO matmuls (loops x trip count) {f['hlo_matmul_flops_per_step']:.3e} total, "
        f"{f['hlo_matmul_flops_per_device']:.3e} per device",
        f"  model 6N + 12LdT (PaLM)          {f['model_flops_per_step_6N']:.3e} "
        f"(HLO / model = {f['hlo_matmul_flops_per_step'] / max(f['model_flops_per_step_6N'], 1):.2f})",
        f"  XLA cost_analysis per device     {f['xla_cost_analysis_flops_per_device']:.3e} "
        f"(counts each loop body once)",
        'collectives per step (per device):',
    ]
    if not r['collectives']:
      lines.append('  none')
    for op in COLLECTIVES:
      v = r['collectives'].get(op)
      if v:
        lines.append(f"  {op:20s} {v['count']:4d} in HLO, {v['per_step']:6d} executed, "
                     f"{_gib(v['bytes_per_step'])}")
  te = r.get('time_estimate')
  if te:
    opt = te['compiler_optimal_seconds']
    lines += [
        'step time estimate per device:',
        f"  compute      {te['compute_s']:9.4f} s   ({te['compute_source']}"
        + (f"; optimal_seconds {opt:.4f} x {te['loop_factor']:.2f}" if opt is not None else '') + ')',
        f"  collectives  {te['collective_s']:9.4f} s   ({_gib(te['collective_bytes_per_device']).strip()}"
        f" at {te['link_bytes_per_s'] / 1e9:.0f} GB/s)",
        f"  step         {te['step_s']:9.4f} s   (max: overlapped) -> "
        f"{te['tokens_per_s_per_device']:,.0f} tokens/s per device, MFU {100 * te['mfu']:.1f}%",
    ]
  for note in r.get('cannot_know') or ():
    lines.append(f'  cannot know: {note}')
  t = r['timing_s']
  lines.append('time (s): ' + ', '.join(f'{k.removesuffix("_s")} {v:.1f}' for k, v in t.items()
                                        if v is not None))
  return '\n'.join(lines)
