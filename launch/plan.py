r"""Plans a training run on a mesh ahead of time: memory, FLOPs, collectives. No arrays.

  python -m launch.plan --config=experiments/pretrain/llama.py:size=7b --mesh=1,256,1 \
      [--device_memory_gb=80] [--out=plan.json] [--nofloor] [--config.KEY=VALUE ...]

``--mesh`` is ``DATA,FSDP,TENSOR`` (or ``data=2,fsdp=64,tensor=8,sequence=1``); the
planner fakes that many CPU devices (``--devices=N`` when an axis is -1) and compiles
the real train step for them. Exit codes: 0 planned (and fits); 1 an error, or the
step does not fit ``--device_memory_gb`` (one line ``error: ...`` on stderr after the
report). See research/plan.py for what each figure means.
"""

import os
import sys


def _early_mesh(argv: list[str]) -> tuple[dict[str, int] | None, int]:
  """Reads --mesh/--devices before JAX is imported (the device count is fixed then)."""
  mesh_arg = devices_arg = None
  for i, a in enumerate(argv):
    for name in ('mesh', 'devices'):
      if a.startswith(f'--{name}='):
        value = a.split('=', 1)[1]
      elif a == f'--{name}' and i + 1 < len(argv):
        value = argv[i + 1]
      else:
        continue
      if name == 'mesh':
        mesh_arg = value
      else:
        devices_arg = value
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
      if k not in ('data', 'fsdp', 'tensor', 'sequence', 'expert'):
        _die(f'--mesh: axis {k!r} is unknown; use data, fsdp, tensor, sequence, expert.')
  if devices_arg is not None:
    try:
      n = int(devices_arg)
    except ValueError:
      n = 0
    if n <= 0:
      _die(f'--devices={devices_arg!r} must be a positive integer.')
    return mesh, n
  if mesh is None or any(v == -1 for v in mesh.values()):
    _die('pass --mesh=DATA,FSDP,TENSOR with explicit sizes (e.g. --mesh=1,256,1), or '
         '--devices=N to resolve a -1 axis.')
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
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(kept + [f'--xla_force_host_platform_device_count={n}'])


if __name__ == '__main__':
  _MESH, _N = _early_mesh(sys.argv[1:])
  _fake_devices(_N)

import json  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from research import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].')
flags.DEFINE_string('mesh', None, 'DATA,FSDP,TENSOR or name=size,... (sets mesh.*).')
flags.DEFINE_integer('devices', None, 'Fake CPU devices (default: the product of --mesh).')
_MEMORY = flags.DEFINE_float('device_memory_gb', None,
                             'Refuse (exit 1) when the per-device peak exceeds this (GiB).')
_FLOOR = flags.DEFINE_boolean('floor', True, 'Also compile a minimal batch to measure the '
                              'state-only memory floor (a second compile).')
_OUT = flags.DEFINE_string('out', None, 'Write the report as JSON here.')


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
  try:
    report = plan_lib.plan(config, device_memory_gb=_MEMORY.value, floor=_FLOOR.value)
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
      json.dump(report, f, indent=2, sort_keys=True)


if __name__ == '__main__':
  runtime.setup()
  sys.exit(runtime.run_main(main))
