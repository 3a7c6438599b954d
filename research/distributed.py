r"""Multi-process (multi-host) initialisation of ``jax.distributed``.

Every process of a job calls :func:`initialize` before any JAX computation. It
finds out how many processes the job has and which one this is, and calls
``jax.distributed.initialize`` only when there is more than one; a single process
never starts the coordination service.

Where the numbers come from (``--distributed``, default ``auto``, first match wins):

  explicit  ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
            (what ``launch.local`` passes), or the same from the environment:
            ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.
  slurm     inside ``srun``: ``SLURM_STEP_NUM_TASKS`` and ``SLURM_PROCID`` (the
            batch script itself, outside srun, is one process); the coordinator is the first node of
            ``SLURM_STEP_NODELIST`` on port ``JAX_COORDINATOR_PORT`` or, like JAX's
            own rule, ``61440 + SLURM_JOB_ID % 4096``.
  ompi      Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_SIZE``/``_RANK``; coordinator
            from ``OMPI_MCA_orte_hnp_uri`` (or ``JAX_COORDINATOR_ADDRESS``).
  k8s       an indexed Job / JobSet pod: ``JOB_COMPLETION_INDEX`` is the process id,
            ``JAX_NUM_PROCESSES`` the count and ``JAX_COORDINATOR_ADDRESS`` pod 0
            behind the headless Service (``launch.k8s`` writes these).
  tpu       a Cloud TPU VM slice (``TPU_WORKER_HOSTNAMES`` with several hosts, or
            forced with ``--distributed=tpu``): JAX's own detection through the TPU
            metadata server.

``--distributed=off`` never initialises; a forced method fails with a message when
its environment is missing.

Failure handling (so that one dead process never leaves the others hanging):

  * ``--distributed_init_timeout_s`` (default 300): how long a process waits for all
    others to connect to the coordinator before failing (JAX's
    ``initialization_timeout``).
  * ``--distributed_heartbeat_timeout_s`` (default 60, JAX's default is 100): a
    process that has sent no heartbeat for this long is declared dead; the
    coordination service then aborts every other process (SIGABRT, exit 134, with
    "Terminating process because the JAX distributed service detected fatal
    errors"). A process killed in the middle of a collective is usually noticed at
    once: its peers' gloo/NCCL connection closes and they raise.
  * ``--distributed_shutdown_timeout_s`` (default 120, JAX's default is 300): at
    exit every process waits at a shutdown barrier for the others; after this long
    it gives up and the job aborts.
  * A process that dies of an uncaught Python exception skips that shutdown
    barrier (``os._exit(1)`` after printing the traceback) so that its peers see it
    gone immediately instead of after the shutdown timeout.
  * A process that hangs while alive (its heartbeat thread still running) is not
    detected by JAX; the cluster's time limit is the backstop (``launch.local``
    kills all processes as soon as one exits with an error).

Exit code after a clean preemption save: :data:`EXIT_PREEMPTED` (75, from
``research.runtime``); the Slurm launcher requeues the job on it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Mapping, Sequence

from absl import flags, logging

from research.runtime import EXIT_PREEMPTED  # noqa: F401  (re-exported for launchers)

METHODS = ('auto', 'off', 'explicit', 'slurm', 'ompi', 'k8s', 'tpu')

DEFAULT_INIT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_SHUTDOWN_TIMEOUT_S = 120

_METHOD = flags.DEFINE_enum(
    'distributed', 'auto', METHODS,
    'How to find the process count and id of a multi-process job; see research/distributed.py.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (explicit multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of the job (explicit multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process index in [0, num_processes) (explicit runs).')
_PORT = flags.DEFINE_integer(
    'coordinator_port', None,
    'Coordinator port for auto-detected clusters (default: JAX_COORDINATOR_PORT or one '
    'derived from the job id).')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None,
    'Local accelerator ids this process owns (default: all visible devices).')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'distributed_init_timeout_s', DEFAULT_INIT_TIMEOUT_S,
    'Seconds to wait for every process to connect to the coordinator.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'distributed_heartbeat_timeout_s', DEFAULT_HEARTBEAT_TIMEOUT_S,
    'Seconds without a heartbeat after which a process is declared dead and the job aborts.')
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    'distributed_shutdown_timeout_s', DEFAULT_SHUTDOWN_TIMEOUT_S,
    'Seconds a finishing process waits at the exit barrier for the others.')


class DistributedError(RuntimeError):
  """The multi-process setup is inconsistent; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """What ``jax.distributed.initialize`` needs. ``None`` fields: JAX detects them."""
  method: str
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Timeouts:
  init_s: int = DEFAULT_INIT_TIMEOUT_S
  heartbeat_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
  shutdown_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S


# ----------------------------------------------------------------------- detection


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise DistributedError(f'{name}={env[name]!r} is not an integer.') from None


def first_slurm_host(nodelist: str) -> str:
  """The first host of a Slurm node list: ``'gpu[007-009,012],cpu1'`` -> ``'gpu007'``."""
  nodelist = nodelist.strip()
  m = re.match(r'([^,\[]*)(\[([^\]]*)\])?', nodelist)
  if not m or not (m.group(1) or m.group(3)):
    raise DistributedError(f'cannot parse the Slurm node list {nodelist!r}.')
  prefix, ranges = m.group(1), m.group(3)
  if ranges is None:
    return prefix
  first = re.split(r'[,-]', ranges)[0]
  return prefix + first


def slurm_port(env: Mapping[str, str]) -> int:
  """JAX's own choice: a port in [61440, 65535] derived from the job id."""
  return 61440 + int(env.get('SLURM_JOB_ID', '0') or 0) % 4096


def _port(env: Mapping[str, str], port: int | None) -> int | None:
  if port:
    return port
  if env.get('JAX_COORDINATOR_PORT'):
    return _int(env, 'JAX_COORDINATOR_PORT')
  return None


def _detect_slurm(env, port):
  # SLURM_STEP_NUM_TASKS exists only inside an srun step: the batch script itself has
  # SLURM_NTASKS and SLURM_PROCID=0 too, but it is one process.
  if 'SLURM_STEP_NUM_TASKS' not in env or 'SLURM_PROCID' not in env:
    if int(env.get('SLURM_NTASKS', '1') or 1) > 1:
      logging.warning('Slurm job with SLURM_NTASKS=%s but not inside srun: running as a '
                      'single process (start one task per process with srun).',
                      env['SLURM_NTASKS'])
    return None
  nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
  if not nodes:
    raise DistributedError('Slurm step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST.')
  address = env.get('JAX_COORDINATOR_ADDRESS') or (
      f'{first_slurm_host(nodes)}:{_port(env, port) or slurm_port(env)}')
  return ProcessSpec('slurm', address, _int(env, 'SLURM_STEP_NUM_TASKS'),
                     _int(env, 'SLURM_PROCID'))


def _detect_ompi(env, port):
  if 'OMPI_COMM_WORLD_SIZE' not in env:
    return None
  address = env.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    uri = env.get('OMPI_MCA_orte_hnp_uri', '')
    m = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
    if not m:
      raise DistributedError(
          'Open MPI job without OMPI_MCA_orte_hnp_uri (Open MPI 5?); set '
          'JAX_COORDINATOR_ADDRESS=HOST:PORT or --coordinator_address.')
    host = next(g for g in m.groups() if g)
    job = int(uri.split('.', 1)[0]) // 4096 if uri.split('.', 1)[0].isdigit() else 0
    address = f'{host}:{_port(env, port) or 61440 + job % 4096}'
  return ProcessSpec('ompi', address, _int(env, 'OMPI_COMM_WORLD_SIZE'),
                     _int(env, 'OMPI_COMM_WORLD_RANK'))


def _detect_k8s(env, port):
  if 'JOB_COMPLETION_INDEX' not in env:
    return None
  if 'JAX_NUM_PROCESSES' not in env:
    raise DistributedError(
        'indexed Kubernetes Job without JAX_NUM_PROCESSES; set it (and '
        'JAX_COORDINATOR_ADDRESS) in the pod env, as launch.k8s does.')
  n = _int(env, 'JAX_NUM_PROCESSES')
  address = env.get('JAX_COORDINATOR_ADDRESS')
  if n > 1 and not address:
    raise DistributedError(
        'indexed Kubernetes Job without JAX_COORDINATOR_ADDRESS (pod 0 behind a headless '
        'Service, e.g. JOB-0.SERVICE:1234).')
  return ProcessSpec('k8s', address, n, _int(env, 'JOB_COMPLETION_INDEX'))


def _detect_tpu(env, port, forced):
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or forced:
    # JAX reads the TPU metadata server (or these env vars) for everything.
    address = env.get('JAX_COORDINATOR_ADDRESS')
    return ProcessSpec('tpu', address, None, None)
  return None


def detect(env: Mapping[str, str] | None = None, *, method: str = 'auto',
           coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, port: int | None = None,
           local_device_ids: Sequence[int] | None = None) -> ProcessSpec | None:
  """The multi-process layout of this process, or ``None`` for a single process."""
  env = os.environ if env is None else env
  if method not in METHODS:
    raise DistributedError(f'--distributed={method!r}; expected one of {METHODS}.')
  if method == 'off':
    return None
  ids = tuple(int(i) for i in local_device_ids) if local_device_ids else None

  def finish(spec: ProcessSpec | None) -> ProcessSpec | None:
    if spec is None:
      return None
    spec = dataclasses.replace(spec, local_device_ids=ids)
    if spec.num_processes is not None:
      if spec.num_processes < 1:
        raise DistributedError(f'{spec.method}: process count {spec.num_processes} < 1.')
      if spec.process_id is None or not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(
            f'{spec.method}: process id {spec.process_id} not in [0, {spec.num_processes}).')
      if spec.num_processes == 1:
        return None
    return spec

  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) or method == 'explicit':
    address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
    n = num_processes if num_processes is not None else (
        _int(env, 'JAX_NUM_PROCESSES') if 'JAX_NUM_PROCESSES' in env else None)
    pid = process_id if process_id is not None else (
        _int(env, 'JAX_PROCESS_ID') if 'JAX_PROCESS_ID' in env else None)
    if n is None or (n > 1 and (address is None or pid is None)):
      raise DistributedError(
          'explicit multi-process run needs --coordinator_address, --num_processes and '
          f'--process_id (got {address!r}, {n!r}, {pid!r}).')
    if n == 1 and pid is None:
      pid = 0
    return finish(ProcessSpec('explicit', address, n, pid))

  if method in ('auto', 'explicit') and all(
      v in env for v in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')):
    return finish(ProcessSpec('explicit', env['JAX_COORDINATOR_ADDRESS'],
                              _int(env, 'JAX_NUM_PROCESSES'), _int(env, 'JAX_PROCESS_ID')))

  detectors = {
      'slurm': lambda: _detect_slurm(env, port),
      'ompi': lambda: _detect_ompi(env, port),
      'k8s': lambda: _detect_k8s(env, port),
      'tpu': lambda: _detect_tpu(env, port, forced=method == 'tpu'),
  }
  if method != 'auto':
    spec = detectors[method]()
    if spec is None:
      raise DistributedError(f'--distributed={method} but this is not a {method} environment.')
    return finish(spec)
  for name in ('slurm', 'ompi', 'k8s', 'tpu'):
    spec = detectors[name]()
    if spec is not None:
      return finish(spec)
  return None


# ----------------------------------------------------------------------- initialise


_initialized: ProcessSpec | None = None


def initialize(spec: ProcessSpec | None, timeouts: Timeouts = Timeouts()) -> ProcessSpec | None:
  """Calls ``jax.distributed.initialize`` for ``spec`` (no-op for ``None``)."""
  global _initialized
  if spec is None:
    return None
  if _initialized is not None:
    return _initialized
  import jax

  kwargs = dict(initialization_timeout=timeouts.init_s,
                heartbeat_timeout_seconds=timeouts.heartbeat_s,
                shutdown_timeout_seconds=timeouts.shutdown_s)
  if spec.method == 'tpu':
    # JAX asks the TPU metadata server for the coordinator and the ids.
    jax.distributed.initialize(coordinator_address=spec.coordinator_address, **kwargs)
  else:
    # Everything is known: skip JAX's own detection, which on Slurm/Open MPI would
    # also restrict each process to one GPU (SLURM_LOCALID) whatever the allocation.
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
        cluster_detection_method='deactivate', **kwargs)
  _install_fast_exit_on_error()
  _initialized = spec
  logging.info('jax.distributed: process %d of %d via %s (coordinator %s; heartbeat timeout '
               '%ds, shutdown timeout %ds)', jax.process_index(), jax.process_count(),
               spec.method, spec.coordinator_address, timeouts.heartbeat_s, timeouts.shutdown_s)
  return spec


def initialize_from_flags() -> ProcessSpec | None:
  """:func:`detect` + :func:`initialize` driven by this module's absl flags."""
  try:
    spec = detect(method=_METHOD.value, coordinator_address=_COORDINATOR.value,
                  num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                  port=_PORT.value, local_device_ids=_LOCAL_DEVICE_IDS.value)
  except DistributedError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(1)
  return initialize(spec, Timeouts(_INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value,
                                   _SHUTDOWN_TIMEOUT.value))


def _install_fast_exit_on_error() -> None:
  """An uncaught exception ends this process at once (no shutdown barrier).

  Without this, the failed process would wait at JAX's exit barrier (up to the
  shutdown timeout) while its peers wait for it in a collective.
  """
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    try:
      previous(exc_type, exc, tb)
      print(f'[process {_initialized.process_id if _initialized else "?"}] exiting after an '
            'uncaught exception; the other processes will stop too.', file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(1)

  sys.excepthook = hook
