r"""Runs a multi-process job on this machine: N processes on 127.0.0.1, M CPU devices each.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/pretrain/tiny.py:smoke=True --workdir=/tmp/mp

Everything after ``--`` goes to ``python -m launch.train`` (``--module`` picks another
entry point) unchanged, as one argv list (no shell). Each process gets
``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=M`` and
``--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I``. Their
output is streamed with a ``[pI]`` prefix.

``--gpus_per_process=G`` runs on this machine's GPUs instead: process ``i`` sees GPUs
``i*G .. i*G+G-1`` (``CUDA_VISIBLE_DEVICES``) and gets the GPU environment of
research/gpu_env.py (XLA/NCCL flags, memory fraction); no CPU devices are faked.

When a process exits with an error the others are given ``--grace_s`` seconds to
stop on their own, then killed; the exit code is the first failure's (75 when every
process stopped after a preemption save). Ctrl-C / SIGTERM is forwarded to all
processes as SIGTERM (the trainer saves and exits 75); a second one kills them.
``--dry_run`` prints the commands instead of running them.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from research.backend_defaults import xla_flags_with_cpu_devices
from research.runtime import EXIT_PREEMPTED

def pick_port() -> int:
  import portpicker
  return portpicker.pick_unused_port()


def process_env(base: dict[str, str], devices: int) -> dict[str, str]:
  """``base`` with CPU platform and ``devices`` fake devices (other XLA flags kept)."""
  env = dict(base)
  env['XLA_FLAGS'] = xla_flags_with_cpu_devices(env.get('XLA_FLAGS', ''), devices)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'
  # The explicit flags win; stale cluster variables must not confuse detection.
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  return env


def gpu_process_envs(base: dict[str, str], num_processes: int, gpus: int
                     ) -> list[dict[str, str]]:
  """One env per process: its own ``gpus`` GPUs and the GPU flags (research/gpu_env.py)."""
  from research import gpu_env
  env = dict(base)
  env['XLA_FLAGS'] = xla_flags_with_cpu_devices(env.get('XLA_FLAGS', ''), None)
  if env.get('JAX_PLATFORMS', '') == 'cpu':
    env.pop('JAX_PLATFORMS')
  env.update(gpu_env.gpu_env(env))
  env['PYTHONUNBUFFERED'] = '1'
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  return [dict(env, CUDA_VISIBLE_DEVICES=','.join(str(i * gpus + j) for j in range(gpus)))
          for i in range(num_processes)]


def commands(num_processes: int, port: int, module: str, args: list[str],
             python: str = sys.executable) -> list[list[str]]:
  """The argv of every process."""
  return [[python, '-m', module, *args, f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={num_processes}', f'--process_id={i}']
          for i in range(num_processes)]


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def run(cmds: list[list[str]], env: dict[str, str] | list[dict[str, str]], *, grace_s: float = 10.0,
        preempted_grace_s: float = 120.0, out=None, cwd: str | None = None) -> int:
  """Runs the processes, prefixes their output, stops all when one fails.

  ``env``: one environment for all, or one per process.
  """
  out = out or sys.stdout
  envs = env if isinstance(env, list) else [env] * len(cmds)
  lock = threading.Lock()
  done: queue.Queue = queue.Queue()
  procs: list[subprocess.Popen] = []
  for i, cmd in enumerate(cmds):
    procs.append(subprocess.Popen(
        cmd, env=envs[i], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True))  # Ctrl-C reaches us only.

  def pump(i: int, p: subprocess.Popen) -> None:
    for raw in iter(p.stdout.readline, b''):
      line = raw.decode('utf-8', 'replace').rstrip('\n')
      with lock:
        out.write(f'[p{i}] {line}\n')
        out.flush()
    p.stdout.close()
    p.wait()
    done.put(i)

  threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for t in threads:
    t.start()

  interrupts = []

  def on_signal(signum, frame):
    interrupts.append(signum)
    sig = signal.SIGTERM if len(interrupts) == 1 else signal.SIGKILL
    with lock:
      out.write(f'[launch.local] got signal {signum}: sending '
                f'{signal.Signals(sig).name} to all processes\n')
      out.flush()
    for p in procs:
      if p.poll() is None:
        p.send_signal(sig)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGINT, signal.SIGTERM):
      previous[s] = signal.signal(s, on_signal)

  first_failure: int | None = None
  codes: dict[int, int] = {}  # In the order the processes exited.
  deadline = None
  try:
    while len(codes) < len(procs):
      try:
        i = done.get(timeout=1.0)
      except queue.Empty:
        if deadline is not None and time.time() >= deadline:
          with lock:
            out.write('[launch.local] killing the remaining processes\n')
            out.flush()
          for p in procs:
            if p.poll() is None:
              p.kill()
          deadline = None  # Killed: just collect them.
        continue
      code = _exit_code(procs[i].returncode)
      codes[i] = code
      if code != 0 and first_failure is None:
        first_failure = code
        wait = preempted_grace_s if code == EXIT_PREEMPTED else grace_s
        with lock:
          out.write(f'[launch.local] process {i} exited with code {code}; stopping the others '
                    f'within {wait:g}s\n')
          out.flush()
        deadline = time.time() + wait
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in threads:
      t.join(timeout=5)
    for s, h in previous.items():
      signal.signal(s, h)
  return job_exit_code(list(codes.values()))


def job_exit_code(codes: list[int]) -> int:
  """The first real failure; else 75 if a process stopped after a preemption save; else 0."""
  errors = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
  if errors:
    return errors[0]
  return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def _define_flags() -> dict:
  """Flags of the command line (defined only when run as a program: --num_processes
  would clash with research/distributed.py's flag of the same name on import)."""
  return dict(
      num=flags.DEFINE_integer('num_processes', 2, 'Number of processes.', lower_bound=1),
      devices=flags.DEFINE_integer('devices_per_process', 1, 'Fake CPU devices per process.',
                                   lower_bound=1),
      port=flags.DEFINE_integer('port', 0, 'Coordinator port (0: pick a free one).'),
      module=flags.DEFINE_string('module', 'launch.train', 'Python module each process runs.'),
      grace=flags.DEFINE_float(
          'grace_s', 10.0, 'After a process fails, seconds before the others are killed.'),
      preempt_grace=flags.DEFINE_float(
          'preempted_grace_s', 120.0,
          'After a process exits 75 (preemption save), seconds the others get to do the same.'),
      gpus=flags.DEFINE_integer(
          'gpus_per_process', 0, 'GPUs per process (0: fake CPU devices instead).',
          lower_bound=0),
      dry_run=flags.DEFINE_boolean('dry_run', False, 'Print the commands; run nothing.'),
  )


def main(argv: list[str], f: dict) -> int:
  args = argv[1:]
  if args and args[0] == '--':
    args = args[1:]
  port = f['port'].value or pick_port()
  cmds = commands(f['num'].value, port, f['module'].value, args)
  gpus = f['gpus'].value if 'gpus' in f else 0
  if gpus:
    env = gpu_process_envs(dict(os.environ), f['num'].value, gpus)
  else:
    env = process_env(dict(os.environ), f['devices'].value)
  if f['dry_run'].value:
    for i, cmd in enumerate(cmds):
      if gpus:
        shown = ' '.join(f'{k}={shlex.quote(env[i][k])}' for k in (
            'CUDA_VISIBLE_DEVICES', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_FLAGS') if k in env[i])
        print(f'{shown} {shlex.join(cmd)}')
      else:
        print(f'JAX_PLATFORMS=cpu XLA_FLAGS={shlex.quote(env["XLA_FLAGS"])} {shlex.join(cmd)}')
    return 0
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for e in env if isinstance(env, list) else [env]:
    e['PYTHONPATH'] = os.pathsep.join(p for p in (repo, e.get('PYTHONPATH')) if p)
  return run(cmds, env, grace_s=f['grace'].value, preempted_grace_s=f['preempt_grace'].value)


if __name__ == '__main__':
  _flags = _define_flags()
  app.run(lambda argv: sys.exit(main(argv, _flags)))
