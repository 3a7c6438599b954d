"""The PyTorch reference is our GPT-2-block model; the side-by-side harness and the
equal-quality script run at smoke size (no timing assertions)."""

import json
import os

import numpy as np
import pytest
import torch

from benchmarks import side_by_side, torch_gpt
from tests.helpers import run_cli, smoke_config


def _ours_and_reference(**overrides):
  from flax import nnx
  from research.benchmark import model_config_summary
  from research.models.transformer import Transformer
  config = smoke_config(**side_by_side.GPT2_BLOCK, **{'model.vocab_size': 259}, **overrides)
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  flat = {'/'.join(str(k) for k in path): np.asarray(var[...])
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  spec = side_by_side.torch_spec({'model': model_config_summary(config),
                                  'seq_len': config.seq_len, 'batch_size': config.batch_size})
  ref = torch_gpt.GPT(torch_gpt.GPTSpec.from_dict(spec))
  torch_gpt.load_research_params(ref, flat)
  return model, ref


@pytest.mark.parametrize('overrides', [{}, {'model.scan_layers': False},
                                       {'model.use_bias': True, 'model.norm_eps': 1e-5}])
def test_reference_computes_our_logits(overrides):
  """Same weights, same tokens: same logits (so a speed ratio compares one network)."""
  import jax.numpy as jnp
  model, ref = _ours_and_reference(**overrides)
  if overrides.get('model.use_bias'):  # Zero-initialised: make the biases matter.
    from flax import nnx
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      if path[-1] == 'bias':
        var[...] = var[...] + 0.05 * (1 + np.arange(var[...].size).reshape(var[...].shape) % 3)
    flat = {'/'.join(str(k) for k in path): np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    torch_gpt.load_research_params(ref, flat)
  tokens = np.random.default_rng(0).integers(3, 259, (2, 16))
  ours = np.asarray(model(jnp.asarray(tokens)))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(tokens)).numpy()
  assert ours.shape == theirs.shape == (2, 16, 259)
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)


def test_reference_decays_only_projection_matrices():
  _, ref = _ours_and_reference()
  opt = torch_gpt.make_optimizer(ref)
  names = {id(p): n for n, p in ref.named_parameters()}
  decayed = sorted(names[id(p)] for p in opt.param_groups[0]['params'])
  assert opt.param_groups[0]['weight_decay'] == 0.1 and opt.param_groups[1]['weight_decay'] == 0
  assert all(n.startswith('blocks.') and n.endswith('.weight') and '.ln_' not in n
             for n in decayed)
  assert len(decayed) == 4 * 2  # qkv, proj, fc, fc_out per layer (smoke: 2 layers).


def test_cores_and_threads_are_checked():
  allowed = sorted(os.sched_getaffinity(0))
  assert side_by_side.parse_cores('', 0) == allowed
  assert side_by_side.parse_cores('', 1) == allowed[:1]
  assert side_by_side.parse_cores(str(allowed[0]), 1) == allowed[:1]
  with pytest.raises(side_by_side.SideBySideError, match='--threads=2 differs'):
    side_by_side.parse_cores(str(allowed[0]), 2)
  with pytest.raises(side_by_side.SideBySideError, match='must be among'):
    side_by_side.parse_cores('4096', 0)


def test_user_overrides_come_last():
  flags = side_by_side.override_flags(
      '4x128', True, ['--config.batch_size=4', '--config=experiments/pretrain/small.py'])
  assert flags[0] == '--config=experiments/pretrain/small.py'
  assert flags.index('--config.batch_size=12') < flags.index('--config.batch_size=4')
  assert '--config.model.mlp_kind=gelu' in flags
  with pytest.raises(side_by_side.SideBySideError, match='--shape'):
    side_by_side.override_flags('huge', True, ['--config=x.py'])


def test_harness_interleaves_pinned_children(tmp_path):
  out = tmp_path / 'sbs.json'
  core = sorted(os.sched_getaffinity(0))[-1]
  r = run_cli(['launch.benchmark', '--against=torch',
               '--config=experiments/pretrain/tiny.py:smoke=True', '--repeats=2', '--steps=2',
               '--warmup=1', f'--cores={core}', f'--out={out}', f'--keep_dir={tmp_path / "k"}'],
              devices=8, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads(out.read_text())
  ours, theirs = rep['runs']['ours'], rep['runs']['torch']
  # A B A B: each child starts after the previous one ended.
  starts = [ours[0]['started_unix'], theirs[0]['started_unix'], ours[1]['started_unix'],
            theirs[1]['started_unix']]
  assert starts == sorted(starts)
  assert rep['cores'] == [core] and rep['threads'] == 1
  for o in ours:  # Pinned to one core, one device (the fake-device flag is not inherited).
    assert o['cpus_allowed'] == 1 and o['device_count'] == 1
    assert o['peak_flops_source'] == 'measured:cpu_matmul_in_process'
    assert o['roofline']['cpus_allowed'] == 1
  assert all(t['threads'] == 1 for t in theirs)
  assert rep['torch_spec']['n_layer'] == ours[0]['model']['num_layers']
  assert rep['torch_spec']['padded_vocab'] == 384
  s = rep['summary']
  for side in ('ours', 'torch'):
    for key in ('tokens_per_sec', 'cpu_s_per_step', 'time_to_first_step_s', 'mfu'):
      assert s[side][key]['min'] <= s[side][key]['median'] <= s[side][key]['max']
      assert s[side][key]['min'] > 0
  assert s['ratio_ours_over_torch']['tokens_per_sec']['median'] > 0
  assert len(rep['load_average_before']) == 3 and len(rep['load_average_after']) == 3
  assert 'measured in the benchmark process' in rep['mfu_method']
  assert 'tokens_per_sec' in r.stdout


def test_harness_refuses_mismatched_threads_in_one_line(tmp_path):
  r = run_cli(['launch.benchmark', '--against=torch',
               '--config=experiments/pretrain/tiny.py:smoke=True', '--cores=0',
               '--threads=2', f'--out={tmp_path / "x.json"}'])
  assert r.returncode == 1
  assert '--threads=2 differs' in r.stderr.strip().splitlines()[-1]


def test_equal_quality_smoke(tmp_path):
  """Same init, same bytes, same LR: identical start, both learn, close at the end."""
  from benchmarks import equal_quality
  text = tmp_path / 'text.txt'
  text.write_text(open(equal_quality.default_text()).read()[:60_000])
  config = equal_quality.build_config('experiments/pretrain/small.py:smoke=True', '', 30, {})
  rep = equal_quality.run_quality(config, text=str(text), eval_every=15, eval_batches=2,
                                  log=lambda _: None)
  first, last = rep['evals'][0], rep['evals'][-1]
  assert abs(first['ours_val'] - first['torch_val']) < 1e-4 * first['torch_val']
  assert last['ours_val'] < first['ours_val'] - 0.5
  assert last['torch_val'] < first['torch_val'] - 0.5
  assert abs(rep['relative_difference']) < 0.02
