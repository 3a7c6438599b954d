r"""Plans a training run on a mesh ahead of time: memory, FLOPs, collectives. No arrays.

  # TPU: the real TPU compiler, on this (CPU-only) machine.
  python -m launch.plan --config=experiments/pretrain/llama.py:size=7b --topology=v5p-256 \
      [--num_slices=2] [--mesh=1,128,1] [--out=plan.json]
  # Search meshes, remat policies and micro-batch counts; rank what fits.
  python -m launch.plan --config=experiments/pretrain/llama.py:size=7b --topology=v5p-256 \
      --search [--max_compiles=12] [--out=search.json]
  # GPU-shaped meshes on fake CPU devices (the CPU compiler: see "cannot know" below).
  python -m launch.plan --config=experiments/pretrain/llama.py:size=7b --mesh=1,256,1 \
      [--device_memory_gb=80] [--memory_fraction=0.9] [--nofloor] [--config.KEY=VALUE ...]

``--topology`` is libtpu's ``GEN:AxB[xC]`` (``v5p:4x4x8``, ``v5e:16x16``, ``v6e:8x8``) or
Cloud's ``v5p-256`` (research/topology.py). It needs libtpu: when this Python has none,
the planner re-executes itself with ``$RESEARCH_TPU_PYTHON`` or
``/opt/tpu-venv/bin/python`` (requirements-tpu.txt says how to create it), or says the
one command that creates it. ``--mesh`` is ``DATA,FSDP,TENSOR`` (or
``data=2,fsdp=64,tensor=8,sequence=1,stage=2``); without it the config's ``mesh.*`` apply.
Without ``--topology`` the planner fakes that many CPU devices (``--devices=N`` when an
axis is -1). Exit codes: 0 planned (and fits); 1 an error, or the step does not fit
(one line ``error: ...`` on stderr after the report). See research/plan.py.
"""

import os
import sys

TPU_PYTHON_DEFAULT = '/opt/tpu-venv/bin/python'
TPU_VENV_COMMAND = ('python3 -m venv /opt/tpu-venv && /opt/tpu-venv/bin/pip install '
                    '-r requirements-tpu.txt')


def _flag_value(argv: list[str], name: str) -> str | None:
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    elif a == f'--{name}' and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
      value = argv[i + 1]
  return value


def _early_mesh(argv: list[str], need_count: bool = True) -> tuple[dict[str, int] | None, int]:
  """Reads --mesh/--devices before JAX is imported (the device count is fixed then)."""
  mesh_arg = _flag_value(argv, 'mesh')
  devices_arg = _flag_value(argv, 'devices')
  mesh = None
  if mesh_arg:
    axes = ('data', 'fsdp', 'tensor')
    items = [s.strip() for s in mesh_arg.split(',') if s.strip()]
    try:
      if all('=' in s for s in items):
        mesh = {k.strip(): int(v) for k, v in (s.split('=', 1) for s in items)}
      else:
        mesh = dict(zip(axes, (int(s) for s in items)))
        if len(items) != 3:
          raise ValueError
    except ValueError:
      _die(f'--mesh={mesh_arg!r} must be DATA,FSDP,TENSOR (e.g. 1,256,1) or '
           f'name=size pairs (data=2,fsdp=64,tensor=8).')
    for k in mesh:
      if k not in ('data', 'stage', 'fsdp', 'tensor', 'sequence', 'expert'):
        _die(f'--mesh: axis {k!r} is unknown; use data, stage, fsdp, tensor, sequence, expert.')
  if not need_count:
    return mesh, 0
  if devices_arg is not None:
    try:
      n = int(devices_arg)
    except ValueError:
      n = 0
    if n <= 0:
      _die(f'--devices={devices_arg!r} must be a positive integer.')
    return mesh, n
  if mesh is None or any(v == -1 for v in mesh.values()):
    _die('pass --mesh=DATA,FSDP,TENSOR with explicit sizes (e.g. --mesh=1,256,1), '
         '--devices=N to resolve a -1 axis, or --topology=GEN:AxBxC for a TPU slice.')
  n = 1
  for v in mesh.values():
    if v <= 0:
      _die(f'--mesh={mesh_arg!r}: sizes must be positive (or -1 with --devices).')
    n *= v
  return mesh, n


def _die(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


def _fake_devices(n: int) -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'
  from research.backend_defaults import xla_flags_with_cpu_devices
  os.environ['XLA_FLAGS'] = xla_flags_with_cpu_devices(os.environ.get('XLA_FLAGS', ''), n)


def _ensure_libtpu(argv: list[str]) -> None:
  """Re-executes in a Python that has libtpu, or exits with the command that makes one."""
  import importlib.util
  os.environ['JAX_PLATFORMS'] = 'cpu'  # Compile-only TPU devices; nothing runs.
  # libtpu takes /tmp/libtpu_lockfile for the TPU chips a process owns; compile-only
  # planners own none, so several may run at once (parallel tests, a search next to
  # a plan).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if importlib.util.find_spec('libtpu') is not None:
    return
  python = os.environ.get('RESEARCH_TPU_PYTHON') or TPU_PYTHON_DEFAULT
  if os.environ.get('_RESEARCH_PLAN_REEXEC') or not os.access(python, os.X_OK):
    _die(f'--topology needs libtpu, which {sys.executable} cannot import and '
         f'{python} does not provide; create the TPU venv once with: {TPU_VENV_COMMAND} '
         f'(or set RESEARCH_TPU_PYTHON to a Python with "jax[tpu]==0.10.2").')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, _RESEARCH_PLAN_REEXEC='1')
  env['PYTHONPATH'] = os.pathsep.join(p for p in (repo, env.get('PYTHONPATH')) if p)
  print(f'launch.plan: libtpu is not importable here; re-running with {python}',
        file=sys.stderr, flush=True)
  os.execve(python, [python, '-m', 'launch.plan', *argv], env)


if __name__ == '__main__':
  _TOPOLOGY_ARG = _flag_value(sys.argv[1:], 'topology')
  if _TOPOLOGY_ARG:
    _MESH, _N = _early_mesh(sys.argv[1:], need_count=False)
    _ensure_libtpu(sys.argv[1:])
  else:
    _MESH, _N = _early_mesh(sys.argv[1:])
    _fake_devices(_N)

import json  # noqa: E402

from absl import flags  # noqa: E402

from research import config_files, runtime  # noqa: E402

_CONFIG = config_files.DEFINE_config_file('config')  # A path or a short name (tiny).
flags.DEFINE_string('mesh', None, 'DATA,FSDP,TENSOR or name=size,... (sets mesh.*).')
flags.DEFINE_integer('devices', None, 'Fake CPU devices (default: the product of --mesh).')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'TPU slice to compile for with the TPU compiler: GEN:AxB[xC] '
    '(v5p:4x4x8, v5e:16x16, v6e:8x8) or Cloud\'s GEN-N (v5p-256).')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'TPU slices joined by DCN (multi-slice); '
                                   'the data axis spans them (mesh.dcn_data).', lower_bound=1)
_MEMORY = flags.DEFINE_float('device_memory_gb', None,
                             'Refuse (exit 1) when the per-device peak exceeds this (GiB; '
                             'TPU default: the chip\'s HBM).')
_FRACTION = flags.DEFINE_float(
    'memory_fraction', None, 'Share of --device_memory_gb a GPU run may use (default: '
    'XLA_PYTHON_CLIENT_MEM_FRACTION, else 0.90 as research/gpu_env.py sets it).')
_FLOOR = flags.DEFINE_boolean('floor', True, 'Also compile a minimal batch to measure the '
                              'state-only memory floor (a second compile).')
_SEARCH = flags.DEFINE_boolean('search', False, 'Search meshes x remat x micro-batches on '
                               '--topology (or the fake devices); rank what fits.')
_MAX_COMPILES = flags.DEFINE_integer('max_compiles', 12, '--search: compile at most this '
                                     'many candidates (the analytically best first).')
_REMATS = flags.DEFINE_string('search_remat', '', '--search: remat policies to try, '
                              'comma-separated (default: all of model.remat).')
_ACCUMS = flags.DEFINE_string('search_accum', '1,2,4', '--search: grad_accum_steps values.')
_TENSORS = flags.DEFINE_string('search_tensor', '1,2,4,8', '--search: tensor-parallel sizes.')
_WORKERS = flags.DEFINE_integer('search_workers', 1, '--search: candidates compiled at once '
                                '(one process each; compiles are mostly single-threaded).')
_OUT = flags.DEFINE_string('out', None, 'Write the report as JSON here.')


def _ints(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise runtime.UserError(f'expected comma-separated integers, got {text!r}.') from None


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from research import plan as plan_lib
  config = _CONFIG.value
  if config is None:
    raise plan_lib.PlanError('--config is required, e.g. --config=experiments/pretrain/llama.py:size=7b.')
  for k, v in (_MESH or {}).items():
    config.mesh[k] = v
  topology = None
  if _TOPOLOGY.value:
    from research import topology as topology_lib
    try:
      topology = topology_lib.parse(_TOPOLOGY.value, _NUM_SLICES.value)
    except topology_lib.TopologyError as e:
      raise plan_lib.PlanError(str(e)) from None
    if topology.num_slices > 1:
      config.mesh.dcn_data = topology.num_slices
  elif _NUM_SLICES.value > 1:
    raise plan_lib.PlanError('--num_slices needs --topology (TPU slices).')
  if _SEARCH.value:
    from research import plan_search
    remats = [s for s in _REMATS.value.split(',') if s.strip()] or None
    result = plan_search.search(
        config, topology=topology, device_memory_gb=_MEMORY.value,
        memory_fraction=_FRACTION.value, remats=remats, accums=_ints(_ACCUMS.value),
        tensors=_ints(_TENSORS.value), max_compiles=_MAX_COMPILES.value,
        workers=_WORKERS.value,
        log=lambda s: print(s, flush=True))
    print(plan_search.format_table(result), flush=True)
    _write(result)
    if not result['ranked']:
      raise plan_lib.PlanError(f'{config.name}: no candidate fits on '
                               f'{result["target"]}; see the table above.')
    return
  try:
    # The floor compile doubles a TPU plan's time: only when asked for there.
    floor = _FLOOR.value and (topology is None or flags.FLAGS['floor'].present)
    report = plan_lib.plan(config, device_memory_gb=_MEMORY.value, floor=floor,
                           topology=topology, memory_fraction=_FRACTION.value)
  except plan_lib.PlanError as e:
    if getattr(e, 'report', None) is not None:
      print(plan_lib.format_report(e.report), flush=True)
      _write(e.report)
    raise
  print(plan_lib.format_report(report), flush=True)
  _write(report)


def _write(report) -> None:
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True, default=str)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
