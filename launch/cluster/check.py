r"""Checks a multi-process setup without training: init, one all-reduce, report.

Run it with any launcher in place of the trainer, e.g.

  python -m launch.local --num_processes=2 --devices_per_process=4 \
      --module=launch.cluster.check
  python -m launch.slurm --nodes=2 --module=launch.cluster.check --dry_run

Every process prints one line ``check: process I/N devices L/G sum=S ok``; it exits
1 if the all-reduce over all devices gives the wrong sum. ``--crash_process=I``
makes process I die right after initialising, to see how (and how fast) the others
stop on this cluster; ``--preempt_once=FILE`` exits 75 the first time (as the
trainer does after a preemption save), to see the launcher requeue the job. Takes the flags of
``research/distributed.py`` (``--distributed``, ``--coordinator_address``...).
"""

import os
import sys

from absl import app, flags

from research import distributed

_PREEMPT_ONCE = flags.DEFINE_string(
    'preempt_once', None, 'Simulate a preemption: if this file does not exist, create it and '
    'exit 75 (EXIT_PREEMPTED) after the check, as the trainer does after a preemption save; '
    'checks that the launcher requeues/restarts the job.')
_CRASH = flags.DEFINE_integer(
    'crash_process', -1, 'Simulate a crash: this process exits at once after initialising '
    '(checks that the others stop instead of hanging).')


def main(argv):
  del argv
  distributed.initialize_from_flags()
  if _CRASH.value >= 0:
    import jax
    if jax.process_index() == _CRASH.value:
      print(f'check: process {_CRASH.value} simulates a crash', flush=True)
      os._exit(3)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  n, i = jax.process_count(), jax.process_index()
  # Each process contributes (i + 1) per local device; the global sum is known.
  local = np.full((jax.local_device_count(),), i + 1, np.float32)
  gathered = multihost_utils.process_allgather(jnp.asarray(local))
  total = float(np.asarray(gathered).sum())
  want = float(sum((p + 1) * jax.local_device_count() for p in range(n)))
  ok = total == want
  print(f'check: process {i}/{n} devices {jax.local_device_count()}/{jax.device_count()} '
        f'sum={total:g} {"ok" if ok else f"WRONG (want {want:g})"}', flush=True)
  multihost_utils.sync_global_devices('launch.cluster.check')
  if not ok:
    sys.exit(1)
  marker = _PREEMPT_ONCE.value
  if marker and not os.path.exists(marker):
    multihost_utils.sync_global_devices('launch.cluster.check: marker seen')
    if i == 0:
      open(marker, 'w').close()
    print(f'check: process {i} simulates a preemption (exit {distributed.EXIT_PREEMPTED})',
          flush=True)
    sys.exit(distributed.EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main)
