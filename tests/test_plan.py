"""The AOT planner: memory vs the analytic estimate, FLOPs with loops, collectives, refusal."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli, smoke_config

# A model whose state dominates a floor batch (0.05B params: 32k vocabulary, d=512), so
# the compiled memory can be checked against the analytic one.
MID = ['--config.model.d_model=512', '--config.model.mlp_dim=1408',
       '--config.model.num_heads=8', '--config.model.vocab_size=32000',
       '--config.model.num_layers=4', '--config.seq_len=64', '--config.batch_size=8']


def test_planner_cli_memory_matches_analytic_and_lists_collectives(tmp_path):
  out = tmp_path / 'plan.json'
  r = run_cli(['launch.plan', '--config=experiments/pretrain/llama.py:smoke=True',
               '--mesh=1,8,1', '--device_memory_gb=80', f'--out={out}', *MID])
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert rep['devices'] == 8 and rep['mesh']['fsdp'] == 8 and rep['fits'] is True
  mem = rep['memory_per_device']
  # Adam: two moments per parameter, float32 like the parameters.
  assert abs(mem['optimizer'] / mem['params'] - 2.0) < 0.01
  assert mem['grads'] == mem['params']
  # FSDP over 8: the per-device parameters are ~1/8 of the total (norms are replicated).
  total = rep['param_count'] * 4
  assert total / 8 <= mem['params'] < total / 8 * 1.1 + 128 * 1024 * 4
  # The compiler's argument buffers are exactly the sharded state.
  assert abs(mem['compiled_state_vs_analytic']) < 0.01, mem['compiled_state_vs_analytic']
  # With activations negligible, the compiled peak matches the analytic state floor.
  assert abs(rep['floor']['vs_analytic_floor']) < 0.10, rep['floor']
  assert mem['compiled']['peak_bytes'] >= rep['floor']['peak_bytes']
  # FSDP gathers weights layer by layer: all-gathers inside the loop, every step.
  gathers = rep['collectives']['all-gather']
  assert gathers['per_step'] > gathers['count'] >= 2, gathers
  # Full remat: forward recomputed in the backward pass, so ~8N instead of 6N per token.
  ratio = rep['flops']['hlo_matmul_flops_per_step'] / rep['flops']['model_flops_per_step_6N']
  assert 1.0 < ratio < 1.5, ratio
  for needle in ('memory per device', 'params+grads+optimizer', 'PEAK', 'FLOPs per step',
                 'all-gather', 'fits in 80 GiB x 0.9 = 72.0 GiB usable: yes',
                 'cannot know: GPU memory'):
    assert needle in r.stdout, r.stdout


def test_planner_refuses_a_config_that_cannot_fit_before_compiling():
  r = run_cli(['launch.plan', '--config=experiments/pretrain/llama.py:size=70b',
               '--mesh=1,8,1', '--device_memory_gb=80', '--nofloor'],
              env={'JAX_LOG_COMPILES': '1'})
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, r.stderr[-3000:]
  msg = errors[0]
  for needle in ('llama_70b does not fit', 'per device', 'fsdp=8', '--device_memory_gb=80'):
    assert needle in msg, msg
  assert 'Compiling' not in r.stderr and 'Traceback' not in r.stderr
  assert 'params+grads+optimizer' in r.stdout  # The analytic part of the report is printed.


def test_planner_bad_mesh_flag_is_one_line():
  r = run_cli(['launch.plan', '--config=experiments/pretrain/llama.py:smoke=True',
               '--mesh=1,x,1'])
  assert r.returncode == 1
  assert r.stderr.startswith('error: --mesh=') and 'DATA,FSDP,TENSOR' in r.stderr, r.stderr


def test_hlo_flops_multiply_loop_bodies_by_trip_count():
  """Scanned and unrolled layers give the same FLOPs; XLA's cost_analysis does not."""
  from research.plan import GiB, PlanError, check_fits, plan
  reports = {}
  for scan in (True, False):
    c = smoke_config(**{'model.vocab_size': 259, 'model.num_layers': 4, 'model.d_model': 128,
                        'model.mlp_dim': 256, 'batch_size': 8, 'mesh.data': 2, 'mesh.fsdp': 2,
                        'mesh.tensor': 2, 'model.scan_layers': scan})
    reports[scan] = plan(c, floor=False)
  f_scan, f_loop = reports[True]['flops'], reports[False]['flops']
  assert f_scan['loops_with_unknown_trip_count'] == 0
  assert abs(f_scan['hlo_matmul_flops_per_step'] / f_loop['hlo_matmul_flops_per_step'] - 1) < 0.02
  assert f_scan['xla_cost_analysis_flops_per_device'] < 0.6 * f_scan['hlo_matmul_flops_per_device']
  assert abs(f_scan['hlo_matmul_flops_per_step'] / f_scan['model_flops_per_step_6N'] - 1) < 0.25
  # Collectives of a scanned step run once per layer: executed > present in the HLO.
  coll = reports[True]['collectives']
  assert any(v['per_step'] > v['count'] for v in coll.values()), coll
  # The fit check after compiling uses the compiled peak.
  rep = reports[True]
  peak = rep['memory_per_device']['compiled']['peak_bytes']
  check_fits(rep, 2 * peak / GiB)
  assert rep['fits']
  with pytest.raises(PlanError, match='the compiled train step needs'):
    check_fits(rep, 0.5 * peak / GiB)
  # CPU devices stand in for GPUs: only the memory fraction of a GPU is usable.
  assert rep['platform'] == 'cpu' and rep['memory_fraction'] == 0.9
  with pytest.raises(PlanError, match='x memory fraction 0.9'):
    check_fits(rep, 1.05 * peak / GiB)
  rep['memory_fraction'] = 1.0
  check_fits(rep, 1.05 * peak / GiB)
  assert rep['fits']
  assert any('memory fraction' in note for note in rep['cannot_know'])
  an = rep['memory_per_device']['analytic']
  assert an['total'] == pytest.approx(an['state'] + an['activations'] + an['fsdp_gather']
                                      + an['accumulator'])


def test_search_candidates_and_analytic_screen_without_compiling():
  from research import plan_search
  from research.plan import analytic_memory, resolve_vocab
  from experiments.pretrain import llama
  c = llama.get_config('size=7b')
  resolve_vocab(c)
  cands = plan_search.candidates(c, 128, tensors=(1, 8), remats=('full', 'none'), accums=(1, 2))
  meshes = {(o['mesh.data'], o['mesh.fsdp'], o['mesh.tensor']) for o in cands}
  assert (1, 128, 1) in meshes and (1, 16, 8) in meshes and (128, 1, 1) in meshes
  assert all(d * f * t == 128 for d, f, t in meshes)
  # remat='none' keeps every layer's attention scores: the screen refuses it at 7B/128.
  full = analytic_memory(c, {'data': 1, 'fsdp': 128, 'tensor': 1})
  c.model.remat = 'none'
  none = analytic_memory(c, {'data': 1, 'fsdp': 128, 'tensor': 1})
  assert none['total'] > 10 * full['total']
  # Micro-batches halve the activations, not the state.
  c.model.remat, c.optimizer.grad_accum_steps = 'full', 2
  acc = analytic_memory(c, {'data': 1, 'fsdp': 128, 'tensor': 1})
  assert acc['saved'] == pytest.approx(full['saved'] / 2)
  assert acc['state'] == full['state']
