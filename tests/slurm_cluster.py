r"""A throwaway one-node Slurm cluster on this machine (tests and manual trials).

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/install_slurm.sh``) and root.
Everything lives in one temporary directory: its own munge key and socket, its own
``slurm.conf`` with free ports, state and logs; nothing under /etc is touched, and
clients find the cluster through ``SLURM_CONF`` (see :meth:`LocalSlurm.env`).

  python -m tests.slurm_cluster            # start one, print its env, wait for Ctrl-C

Facts (slurm-wlm 22.05): no cgroup.conf, ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, ``SelectType=select/cons_tres``; start to a working
``srun`` takes ~15 s.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

BINARIES = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'sinfo', 'scontrol', 'scancel')


def missing_binaries() -> list[str]:
  dirs = os.environ.get('PATH', '').split(os.pathsep) + ['/usr/sbin', '/sbin']
  return [b for b in BINARIES if not any(os.access(os.path.join(d, b), os.X_OK) for d in dirs)]


def _which(name: str) -> str:
  path = shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')
  if not path:
    raise FileNotFoundError(f'{name} not found: run .ci/install_slurm.sh')
  return path


def _free_port() -> int:
  import portpicker
  return portpicker.pick_unused_port()


def _node_name() -> str:
  """This host's short name if it resolves (jax's Slurm coordinator uses it), else localhost."""
  name = socket.gethostname().split('.')[0]
  try:
    socket.gethostbyname(name)
    return name
  except OSError:
    return 'localhost'


SLURM_CONF = """\
ClusterName=testcluster
FirstJobId={first_job_id}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s): short here so that the requeue test is quick.
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class LocalSlurm:
  """Starts munged, slurmctld and slurmd; :meth:`stop` ends exactly those processes."""

  def __init__(self, cpus: int = 4, root: str | None = None):
    self.dir = tempfile.mkdtemp(prefix='slurm-test-', dir=root)
    self.cpus = cpus
    self.node = _node_name()
    self.conf = os.path.join(self.dir, 'slurm.conf')
    self.munge_socket = os.path.join(self.dir, 'munge', 'munge.socket')
    self._procs: list[subprocess.Popen] = []

  def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env['SLURM_CONF'] = self.conf
    env['PATH'] = env.get('PATH', '') + ':/usr/sbin:/sbin'
    return env

  def start(self, timeout: float = 90.0) -> 'LocalSlurm':
    if os.geteuid() != 0:
      raise PermissionError('the local Slurm cluster needs root (munged, slurmd).')
    for sub in ('state', 'spool', 'munge'):
      os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
    os.chmod(self.dir, 0o711)
    os.chmod(os.path.join(self.dir, 'munge'), 0o711)
    key = os.path.join(self.dir, 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    with open(self.conf, 'w') as f:
      f.write(SLURM_CONF.format(node=self.node, dir=self.dir, cpus=self.cpus,
                                ctld_port=_free_port(), slurmd_port=_free_port(),
                                munge_socket=self.munge_socket,
                                # Job ids (and so JAX's derived coordinator ports) differ
                                # between clusters started at the same time.
                                first_job_id=random.randint(1000, 900_000)))
    munge_log = os.path.join(self.dir, 'munged.log')
    self._spawn([_which('munged'), '--foreground', '--force', f'--key-file={key}',
                 f'--socket={self.munge_socket}', f'--log-file={munge_log}',
                 f'--pid-file={self.dir}/munged.pid', f'--seed-file={self.dir}/munged.seed'])
    self._wait(lambda: os.path.exists(self.munge_socket), 20, 'munged socket')
    self._spawn([_which('slurmctld'), '-D', '-i', '-f', self.conf])
    self._spawn([_which('slurmd'), '-D', '-f', self.conf, '-N', self.node])
    self._wait(self._node_idle, timeout, f'node {self.node} idle')
    return self

  def _spawn(self, cmd: list[str]) -> None:
    log = open(os.path.join(self.dir, os.path.basename(cmd[0]) + '.out'), 'ab')
    self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env(),
                                        start_new_session=True))

  def _node_idle(self) -> bool:
    for p in self._procs:
      if p.poll() is not None:
        raise RuntimeError(f'{p.args[0]} exited with {p.returncode}; logs in {self.dir}:\n'
                           + self.logs())
    r = subprocess.run([_which('sinfo'), '-h', '-N', '-o', '%T'], env=self.env(),
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().rstrip('*') == 'idle'

  def _wait(self, ready, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if ready():
        return
      time.sleep(0.5)
    raise TimeoutError(f'local Slurm: {what} not ready after {timeout:.0f}s; logs in '
                       f'{self.dir}:\n{self.logs()}')

  def logs(self) -> str:
    out = []
    for name in ('munged.log', 'slurmctld.log', 'slurmd.log', 'munged.out', 'slurmctld.out',
                 'slurmd.out'):
      path = os.path.join(self.dir, name)
      if os.path.exists(path):
        out.append(f'--- {name}\n' + open(path, errors='replace').read()[-3000:])
    return '\n'.join(out)

  def wait_job(self, job_id: str, timeout: float) -> str:
    """Waits until the job leaves the queue; returns its final state (scontrol)."""
    deadline = time.time() + timeout
    state = ''
    while time.time() < deadline:
      r = subprocess.run([_which('scontrol'), 'show', 'job', '-o', job_id], env=self.env(),
                         capture_output=True, text=True)
      fields = dict(kv.split('=', 1) for kv in r.stdout.split() if '=' in kv)
      state = fields.get('JobState', '')
      if state in ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY',
                   'PREEMPTED', 'BOOT_FAIL', 'DEADLINE'):
        return state + ' ' + fields.get('ExitCode', '')
      time.sleep(1)
    subprocess.run([_which('scancel'), job_id], env=self.env())
    raise TimeoutError(f'Slurm job {job_id} still {state!r} after {timeout:.0f}s')

  def stop(self) -> None:
    for p in reversed(self._procs):
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in reversed(self._procs):
      try:
        p.wait(timeout=15)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    self._procs.clear()

  def __enter__(self) -> 'LocalSlurm':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


if __name__ == '__main__':
  cluster = LocalSlurm().start()
  print(f'export SLURM_CONF={cluster.conf}   # logs in {cluster.dir}; Ctrl-C stops it',
        flush=True)
  try:
    signal.pause()
  except KeyboardInterrupt:
    pass
  finally:
    cluster.stop()
