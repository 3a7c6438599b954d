"""launch.gpu_check at smoke size on CPU, and the GPU environment the launchers apply.

On CPU the cuDNN comparisons are reported as "skipped: no GPU" in the JSON: that is
what the product does without a GPU; everything else (XLA attention against a float32
reference, bf16 vs f32 losses, all-reduce bandwidth and correctness, the 1B config's
benchmark at smoke size) runs and is checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from research import gpu_env
from tests.helpers import run_cli


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_check') / 'gpu_check.json'
  r = run_cli(['launch.gpu_check', '--smoke', f'--out={out}'], devices=4, timeout=1200)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  assert 'gpu_check on 4 x cpu' in r.stdout and 'OK' in r.stdout, r.stdout[-2000:]
  return json.loads(out.read_text())


def test_attention_cases_check_xla_and_skip_cudnn_without_a_gpu(report):
  att = report['attention']
  assert set(att) >= {'causal', 'padding_causal', 'padding_bidirectional', 'gqa_causal',
                      'sliding_window', 'segment_ids'}
  for name, case in att.items():
    if not isinstance(case, dict) or 'shape' not in case:
      continue
    assert case['cudnn'] == 'skipped: no GPU', (name, case)
    # bfloat16 inputs against a float32 softmax reference with an explicit mask.
    assert case['xla_vs_reference_rel_err'] < 2e-2, (name, case)
    assert case['status'] == 'pass'
  assert report['gpu'] is False and report['machine']['platform'] == 'cpu'


def test_precision_allreduce_and_benchmark_figures(report):
  p = report['precision']
  assert p['status'] == 'pass' and len(p['loss_float32']) == p['steps']
  assert 0 <= p['max_rel_diff'] < 2e-2
  assert p['loss_float32'] != p['loss_bfloat16']  # Two different computations ran.
  a = report['allreduce']
  assert a['status'] == 'pass' and len(a['pairs']) == 6  # 4 devices: every pair.
  assert all(v['correct'] and v['busbw_GBps'] > 0 for v in a['pairs'].values())
  assert a['all_devices']['devices'] == 4 and a['all_devices']['correct']
  b = report['benchmark']
  assert b['status'] == 'pass' and b['tokens_per_sec'] > 0
  assert b['config'] == 'gpt2.py:size=1b,smoke=True'
  assert 0 < b['mfu_vs_989_tflops'] < 1e-3  # CPU against an H100's peak.
  assert report['ok'] is True


def test_gpu_flags_are_known_to_this_xla():
  """XLA aborts on an unknown flag: every flag we set parses (and a bogus one fails)."""
  code = 'import jax; print(jax.jit(lambda x: x + 1)(1))'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(gpu_env.XLA_GPU_FLAGS))
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == '2', r.stderr[-2000:]
  env['XLA_FLAGS'] = '--xla_gpu_no_such_flag=true'
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode != 0


def test_gpu_env_merges_with_what_the_user_set():
  env = gpu_env.gpu_env({})
  assert env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.90' and env['NCCL_DEBUG'] == 'WARN'
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in env['XLA_FLAGS'].split()
  user = {'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/d',
          'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.5'}
  env = gpu_env.gpu_env(user)
  flags = env['XLA_FLAGS'].split()
  assert '--xla_gpu_enable_latency_hiding_scheduler=false' in flags
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' not in flags
  assert '--xla_dump_to=/d' in flags and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in env
  assert gpu_env.memory_fraction({}) == 0.90
  assert gpu_env.memory_fraction(user) == 0.5
  assert gpu_env.memory_fraction({'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}) == 1.0


def test_launchers_apply_the_gpu_env_only_for_gpus():
  from launch.k8s import manifest
  from launch.slurm import sbatch
  gpu = sbatch.job_script(sbatch.SlurmOptions(gpus_per_node=8,
                                              env={'XLA_FLAGS': '--xla_dump_to=/d'}), [])
  assert 'export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90' in gpu
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in gpu and '--xla_dump_to=/d' in gpu
  cpu = sbatch.job_script(sbatch.SlurmOptions(gpus_per_node=0), [])
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in cpu and 'xla_gpu' not in cpu
  objs = manifest.manifests(manifest.K8sOptions(image='img', gpus_per_process=8), [])
  env = {e['name']: e['value'] for e in objs[1]['spec']['template']['spec']['containers'][0]['env']}
  assert env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.90' and 'xla_gpu' in env['XLA_FLAGS']
  objs = manifest.manifests(manifest.K8sOptions(image='img', gpus_per_process=0), [])
  names = {e['name'] for e in objs[1]['spec']['template']['spec']['containers'][0]['env']}
  assert 'XLA_FLAGS' not in names
  from launch import local
  envs = local.gpu_process_envs({'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS':
                                 '--xla_force_host_platform_device_count=8'}, 2, 4)
  assert [e['CUDA_VISIBLE_DEVICES'] for e in envs] == ['0,1,2,3', '4,5,6,7']
  assert 'JAX_PLATFORMS' not in envs[0]
  assert 'force_host_platform' not in envs[0]['XLA_FLAGS']
  assert envs[1]['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.90'
