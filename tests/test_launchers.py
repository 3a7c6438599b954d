"""Launchers: what they generate is valid, and hostile argument values arrive intact.

The generated shell (sbatch scripts, the TPU VM remote command) is executed here
with fake ``srun``/``scontrol``/``python3`` programs that record the argv they get;
the test compares it with the original list. Kubernetes YAML is parsed back with
``yaml.safe_load_all``.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest
import yaml

from launch import local
from launch.cluster.common import LaunchError
from launch.k8s import manifest
from launch.slurm import sbatch
from launch.tpu import command as tpu
from research import distributed as dist
from tests.helpers import REPO

# Spaces, both quotes, command substitution, backticks, globs, variables, a newline.
HOSTILE = [
    '--config.name=a b "c" \'d\' $(rm -rf /) `touch PWNED` ; echo pwned > PWNED',
    "--config.sample_prompt=it's\nline two",
    '--workdir=/tmp/$HOME/*',
    '--config.data.path=\\back\\slash',
    '--',  # A lone -- inside the trainer's args.
]


def _cli(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=env)


def _fake_program(bindir, name: str, body: str) -> None:
  """A Python program named ``name`` that records its argv to $RECORD_DIR/name.jsonl."""
  path = os.path.join(bindir, name)
  with open(path, 'w') as f:
    f.write(f'#!{sys.executable}\n'
            'import json, os, sys\n'
            f'with open(os.path.join(os.environ["RECORD_DIR"], "{name}.jsonl"), "a") as f:\n'
            '  f.write(json.dumps(sys.argv[1:]) + "\\n")\n' + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _records(d, name: str) -> list[list[str]]:
  path = os.path.join(d, f'{name}.jsonl')
  if not os.path.exists(path):
    return []
  return [json.loads(line) for line in open(path)]


@pytest.fixture
def fakes(tmp_path):
  """Fake srun (returns $FAKE_RC), scontrol and python3 on PATH."""
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  _fake_program(bindir, 'srun', 'sys.exit(int(os.environ.get("FAKE_RC", "0")))\n')
  _fake_program(bindir, 'scontrol', '')
  # python3 exits 75 on its first call when FAKE_PREEMPT_ONCE is set, then 0.
  _fake_program(bindir, 'python3',
                'calls = len(open(os.path.join(os.environ["RECORD_DIR"], "python3.jsonl"))'
                '.readlines())\n'
                'sys.exit(75 if os.environ.get("FAKE_PREEMPT_ONCE") and calls == 1 else 0)\n')
  records = tmp_path / 'records'
  records.mkdir()
  env = dict(os.environ, PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}',
             RECORD_DIR=str(records), SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='n1')
  return env, records


def _bash_n(script: str) -> None:
  r = subprocess.run(['bash', '-n'], input=script, text=True, capture_output=True)
  assert r.returncode == 0, r.stderr


def _without_srun_options(argv: list[str]) -> list[str]:
  i = 0
  while argv[i].startswith('-'):
    i += 1
  return argv[i:]


# ----------------------------------------------------------------------- Slurm


def test_sbatch_script_directives_and_argv_round_trip(tmp_path, fakes):
  env, records = fakes
  o = sbatch.SlurmOptions(nodes=4, tasks_per_node=1, gpus_per_node=8, time='04:00:00',
                          partition='gpu', account='proj-1', job_name='big',
                          sbatch_lines=['--constraint=h100', '#SBATCH --exclusive'],
                          env={'NCCL_DEBUG': 'WARN', 'ODD': 'a b $(x)'}, python='python3',
                          setup=['echo setup-ran'], port=12345)
  script = sbatch.job_script(o, HOSTILE)
  _bash_n(script)
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --time=04:00:00', '#SBATCH --partition=gpu', '#SBATCH --account=proj-1',
               '#SBATCH --job-name=big', '#SBATCH --constraint=h100', '#SBATCH --exclusive',
               '#SBATCH --requeue', '#SBATCH --signal=TERM@120', '#SBATCH --open-mode=append'):
    assert line + '\n' in script, line

  # Run it: srun gets exactly the trainer argv; 0 -> no requeue.
  r = subprocess.run(['bash', '-c', script], env=env, cwd=tmp_path, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  assert 'setup-ran' in r.stdout
  [srun] = _records(records, 'srun')
  assert srun[:6] == ['--nodes=4', '--ntasks=4', '--ntasks-per-node=1', '--label',
                      '--kill-on-bad-exit=0', '--wait=60']
  assert _without_srun_options(srun) == ['python3', '-m', 'launch.train', *HOSTILE]
  assert _records(records, 'scontrol') == []
  assert not (tmp_path / 'PWNED').exists()


def test_sbatch_requeues_on_preemption_code_only(tmp_path, fakes):
  env, records = fakes
  script = sbatch.job_script(sbatch.SlurmOptions(max_requeues=3), ['--workdir=w'])
  r = subprocess.run(['bash', '-c', script], env=dict(env, FAKE_RC='75'), capture_output=True,
                     text=True)
  assert r.returncode == dist.EXIT_PREEMPTED == 75
  assert _records(records, 'scontrol') == [['requeue', '4242']]
  # Too many restarts: no requeue. Another failure: no requeue.
  for extra in ({'FAKE_RC': '75', 'SLURM_RESTART_COUNT': '3'}, {'FAKE_RC': '1'}):
    r = subprocess.run(['bash', '-c', script], env=dict(env, **extra), capture_output=True,
                       text=True)
    assert r.returncode == int(extra['FAKE_RC'])
  assert len(_records(records, 'scontrol')) == 1


def test_sbatch_gpus_split_over_tasks_and_bad_values():
  s = sbatch.job_script(sbatch.SlurmOptions(tasks_per_node=4, gpus_per_node=8), [])
  assert '#SBATCH --gpus-per-task=2\n' in s and '--gpus-per-node' not in s
  with pytest.raises(LaunchError, match='multiple'):
    sbatch.job_script(sbatch.SlurmOptions(tasks_per_node=3, gpus_per_node=8), [])
  for bad in (dict(job_name='a b'), dict(partition='p\n#SBATCH --x'), dict(output='a b.out'),
              dict(sbatch_lines=['--x\nrm -rf /'])):
    with pytest.raises(LaunchError):
      sbatch.job_script(sbatch.SlurmOptions(**bad), [])


def test_sbatch_array_runs_line_i_plus_1(tmp_path, fakes):
  env, records = fakes
  sweep = tmp_path / 'sweep'
  sweep.mkdir()
  out = tmp_path / 'out.json'
  dump = 'import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], "w"))'
  argvs = [[sys.executable, '-c', dump, str(out), f'run{i}', *HOSTILE[:2]] for i in range(3)]
  (sweep / 'commands.txt').write_text(
      '\n'.join(shlex.join(a).replace('\n', '\\n') for a in argvs) + '\n')
  o = sbatch.SlurmOptions(max_parallel=2, python='python3')
  script, n = sbatch.array_script(o, str(sweep))
  assert n == 3
  _bash_n(script)
  assert '#SBATCH --array=0-2%2\n' in script
  assert f'#SBATCH --output={sweep}/slurm-%x-%A_%a.out\n' in script
  # srun runs what follows its options (here: bash -c "$CMD").
  bindir = env['PATH'].split(os.pathsep)[0]
  _fake_program(bindir, 'srun', 'i = 1\nwhile sys.argv[i].startswith("-"): i += 1\n'
                'import subprocess\nsys.exit(subprocess.call(sys.argv[i:]))\n')
  r = subprocess.run(['bash', '-c', script], env=dict(env, SLURM_ARRAY_TASK_ID='1'), cwd=tmp_path,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  got = json.load(open(out))
  assert got == [str(out), 'run1', HOSTILE[0], HOSTILE[1].replace('\n', '\\n')]
  assert not (tmp_path / 'PWNED').exists()
  # Line 4 does not exist.
  r = subprocess.run(['bash', '-c', script], env=dict(env, SLURM_ARRAY_TASK_ID='3'),
                     capture_output=True, text=True)
  assert r.returncode == 1 and 'no line 4' in r.stderr


def test_slurm_cli_dry_run(tmp_path):
  r = _cli('launch.slurm', '--nodes=2', '--gpus_per_node=8', '--partition=gpu', '--dry_run',
           '--', *HOSTILE)
  assert r.returncode == 0, r.stderr
  script = r.stdout
  _bash_n(script)
  assert '#SBATCH --nodes=2\n' in script and 'would run: sbatch' in script
  srun_line = next(line for line in script.splitlines() if line.startswith('srun '))
  # The one line with a newline inside a quoted argument spans two lines.
  start = script.index(srun_line)
  tail = script[start:script.index('\nrc=$?', start)]
  assert _without_srun_options(shlex.split(tail)[1:])[-len(HOSTILE):] == HOSTILE
  r = _cli('launch.slurm', '--job_name=a b', '--dry_run')
  assert r.returncode == 1 and 'job_name' in r.stderr
  sweep = tmp_path / 's'
  sweep.mkdir()
  (sweep / 'commands.txt').write_text('echo 1\necho 2\n')
  r = _cli('launch.slurm', f'--sweep_dir={sweep}', '--dry_run')
  assert r.returncode == 0 and '#SBATCH --array=0-1\n' in r.stdout, r.stderr


# ----------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize('kind', ['job', 'jobset'])
def test_k8s_manifest(kind):
  r = _cli('launch.k8s', '--name=tiny-run', '--image=registry.example/research:1',
           f'--kind={kind}', '--num_processes=4', '--gpus_per_process=8', '--port=2345',
           '--env=NCCL_DEBUG=WARN', '--volume=runs:/runs', '--dry_run', '--', *HOSTILE)
  assert r.returncode == 0, r.stderr
  docs = [d for d in yaml.safe_load_all(r.stdout) if d]
  if kind == 'job':
    svc, job = docs
    assert svc['kind'] == 'Service' and svc['spec']['clusterIP'] == 'None'
    assert svc['spec']['selector'] == {'job-name': 'tiny-run'}
    assert job['kind'] == 'Job'
    spec = job['spec']
    pod = spec['template']['spec']
    assert pod['subdomain'] == 'tiny-run' and pod['restartPolicy'] == 'Never'
    rules = spec['podFailurePolicy']['rules']
    assert rules[0]['action'] == 'Ignore' and rules[0]['onExitCodes']['values'] == [75]
    coordinator = 'tiny-run-0.tiny-run:2345'
  else:
    [js] = docs
    assert js['apiVersion'].startswith('jobset.x-k8s.io/') and js['kind'] == 'JobSet'
    assert js['spec']['network']['enableDNSHostnames'] is True
    spec = js['spec']['replicatedJobs'][0]['template']['spec']
    pod = spec['template']['spec']
    coordinator = 'tiny-run-workers-0-0.tiny-run:2345'
  assert spec['completionMode'] == 'Indexed'
  assert spec['completions'] == spec['parallelism'] == 4
  [c] = pod['containers']
  assert c['command'] == ['python', '-m', 'launch.train', *HOSTILE,
                          '--distributed_init_timeout_s=900']
  assert c['resources']['limits'] == {'nvidia.com/gpu': 8}
  env = {e['name']: e['value'] for e in c['env']}
  assert env['JAX_COORDINATOR_ADDRESS'] == coordinator and env['NCCL_DEBUG'] == 'WARN'
  assert {'mountPath': '/runs', 'name': 'vol0'} in c['volumeMounts']
  # What research/distributed.py makes of pod 3's env (the Job adds JOB_COMPLETION_INDEX).
  spec3 = dist.detect({**env, 'JOB_COMPLETION_INDEX': '3'})
  assert spec3 == dist.ProcessSpec('k8s', coordinator, 4, 3)


def test_k8s_rejects_bad_names():
  for bad in (dict(name='Bad_Name', image='i'), dict(name='ok', image='')):
    with pytest.raises(LaunchError):
      manifest.manifests(manifest.K8sOptions(**bad), [])


# ----------------------------------------------------------------------- Cloud TPU VM


def test_tpu_command_round_trip(tmp_path, fakes):
  env, records = fakes
  repo = tmp_path / 'my repo'
  repo.mkdir()
  r = _cli('launch.tpu', '--tpu_name=v5p-64', '--zone=us-east5-a', '--project=proj',
           f'--repo_dir={repo}', '--env=A=x y', '--setup=echo setup-ran', '--dry_run', '--',
           *HOSTILE)
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v5p-64',
                      '--zone=us-east5-a', '--project=proj', '--worker=all']
  [remote] = [a[len('--command='):] for a in argv if a.startswith('--command=')]
  # What each worker's shell does with it.
  r = subprocess.run(['bash', '-c', remote], env=env, cwd=tmp_path, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  assert 'setup-ran' in r.stdout
  assert _records(records, 'python3') == [['-m', 'launch.train', *HOSTILE, '--distributed=tpu']]
  assert not (tmp_path / 'PWNED').exists() and not (repo / 'PWNED').exists()


def test_tpu_retry_on_preemption(tmp_path, fakes):
  env, records = fakes
  o = tpu.TpuOptions(tpu_name='t', repo_dir=str(tmp_path), retry_preempted=True)
  remote = tpu.remote_command(o, ['--workdir=w'])
  r = subprocess.run(['bash', '-c', remote], env=dict(env, FAKE_PREEMPT_ONCE='1'),
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert len(_records(records, 'python3')) == 2
  assert tpu.remote_command(tpu.TpuOptions(repo_dir='~/r x'), []).startswith("cd ~/'r x' && ")


# ----------------------------------------------------------------------- launch.local


def test_local_dry_run_round_trip():
  # As a user with no XLA_FLAGS of their own (the suite's are passed through, but for
  # the device count, which launch.local replaces).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = _cli('launch.local', '--num_processes=2', '--devices_per_process=4', '--port=1234',
           '--dry_run', '--', *HOSTILE, env=env)
  assert r.returncode == 0, r.stderr
  cmds = [shlex.split(block) for block in _split_commands(r.stdout)]
  assert len(cmds) == 2
  for i, cmd in enumerate(cmds):
    assert cmd[:2] == ['JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=4']
    assert cmd[3:] == ['-m', 'launch.train', *HOSTILE, '--coordinator_address=127.0.0.1:1234',
                       '--num_processes=2', f'--process_id={i}']


def _split_commands(text: str) -> list[str]:
  """Commands printed one after another (a quoted argument may hold a newline)."""
  out, cur = [], ''
  for line in text.splitlines(keepends=True):
    cur += line
    try:
      shlex.split(cur)
    except ValueError:  # Inside a quote: continue on the next line.
      continue
    out.append(cur)
    cur = ''
  return out


def test_local_run_stops_the_others_when_one_fails(capsys):
  t = time.time()
  code = local.run([[sys.executable, '-c', 'import time; print("up", flush=True); time.sleep(120)'],
                    [sys.executable, '-c', 'import sys; print("bye"); sys.exit(3)']],
                   dict(os.environ), grace_s=1)
  out = capsys.readouterr().out
  assert code == 3
  assert time.time() - t < 30
  assert '[p1] bye' in out and 'process 1 exited with code 3' in out
  assert 'killing the remaining processes' in out


def test_local_exit_codes():
  assert local.job_exit_code([0, 0]) == 0
  assert local.job_exit_code([75, 75]) == 75
  assert local.job_exit_code([75, 137]) == 137
  assert local.job_exit_code([1, 137]) == 1
  env = local.process_env({'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8',
                           'JAX_PROCESS_ID': '3'}, 4)
  assert env['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_force_host_platform_device_count=4']
  assert env['JAX_PLATFORMS'] == 'cpu' and 'JAX_PROCESS_ID' not in env
