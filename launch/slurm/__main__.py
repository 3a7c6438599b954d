r"""Submits (or with --dry_run prints) an sbatch script; see launch/slurm/sbatch.py.

  python -m launch.slurm [--nodes=N --tasks_per_node=T --gpus_per_node=G --time=HH:MM:SS
      --partition=P --account=A --sbatch_line='--constraint=h100' ...] [--dry_run] \
      -- <launch.train flags>
  python -m launch.slurm --sweep_dir=DIR [--max_parallel=K] [...]   # array job
"""

import sys

from absl import app, flags

from launch.cluster.common import LaunchError, parse_env, passthrough, submit
from launch.slurm import sbatch

_d = sbatch.SlurmOptions()
_JOB_NAME = flags.DEFINE_string('job_name', _d.job_name, 'Slurm job name.')
_NODES = flags.DEFINE_integer('nodes', _d.nodes, 'Nodes.')
_TASKS = flags.DEFINE_integer('tasks_per_node', _d.tasks_per_node,
                              'Tasks (= JAX processes) per node.')
_GPUS = flags.DEFINE_integer('gpus_per_node', _d.gpus_per_node, 'GPUs per node (0: none).')
_CPUS = flags.DEFINE_integer('cpus_per_task', _d.cpus_per_task, 'CPUs per task (0: default).')
_MEM = flags.DEFINE_string('mem', _d.mem, 'Memory per node, e.g. 200G (empty: default).')
_TIME = flags.DEFINE_string('time', _d.time, 'Time limit (Slurm syntax).')
_PARTITION = flags.DEFINE_string('partition', _d.partition, 'Partition.')
_ACCOUNT = flags.DEFINE_string('account', _d.account, 'Account.')
_QOS = flags.DEFINE_string('qos', _d.qos, 'QOS.')
_OUTPUT = flags.DEFINE_string('output', _d.output, 'Log file (%j job id, %A/%a array ids).')
_CHDIR = flags.DEFINE_string('chdir', _d.chdir, 'Working directory of the job (default: cwd).')
_LINES = flags.DEFINE_multi_string('sbatch_line', [], 'Extra sbatch directive (repeatable), '
                                   "e.g. --sbatch_line='--constraint=h100'.")
_SETUP = flags.DEFINE_multi_string('setup', [], 'Shell line run before srun (repeatable; '
                                   'written as is, e.g. "source .venv/bin/activate").')
_ENV = flags.DEFINE_multi_string('env', [], 'NAME=VALUE exported in the job (repeatable).')
_PYTHON = flags.DEFINE_string('python', _d.python, 'Python interpreter on the nodes.')
_MODULE = flags.DEFINE_string('module', _d.module, 'Module every task runs.')
_PORT = flags.DEFINE_integer('port', _d.port, 'Coordinator port (0: derived from the job id).')
_REQUEUE = flags.DEFINE_boolean('requeue', _d.requeue, 'Requeue after a preemption save (75).')
_GRACE = flags.DEFINE_integer('signal_grace_s', _d.signal_grace_s,
                              'Send SIGTERM this long before the time limit (0: no signal).')
_MAX_REQUEUES = flags.DEFINE_integer('max_requeues', _d.max_requeues, 'Requeue at most this often.')
_WAIT = flags.DEFINE_integer('wait_s', _d.wait_s,
                             'srun --wait: seconds before the other tasks are killed once one ends.')
_SWEEP = flags.DEFINE_string('sweep_dir', '', 'Array job over DIR/commands.txt.')
_MAX_PARALLEL = flags.DEFINE_integer('max_parallel', 0, 'Array: tasks at once (0: no limit).')
_SAVE = flags.DEFINE_string('save_script', '', 'Also write the script to this path.')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the script and the sbatch command.')


def main(argv):
  args = passthrough(argv)
  try:
    opts = sbatch.SlurmOptions(
        job_name=_JOB_NAME.value, nodes=_NODES.value, tasks_per_node=_TASKS.value,
        gpus_per_node=_GPUS.value, cpus_per_task=_CPUS.value, mem=_MEM.value,
        time=_TIME.value, partition=_PARTITION.value, account=_ACCOUNT.value, qos=_QOS.value,
        output=_OUTPUT.value, chdir=_CHDIR.value, sbatch_lines=_LINES.value,
        setup=_SETUP.value, env=parse_env(_ENV.value), python=_PYTHON.value,
        module=_MODULE.value, port=_PORT.value, requeue=_REQUEUE.value,
        signal_grace_s=_GRACE.value, max_requeues=_MAX_REQUEUES.value, wait_s=_WAIT.value,
        max_parallel=_MAX_PARALLEL.value)
    if _SWEEP.value:
      if args:
        raise LaunchError('--sweep_dir takes its commands from commands.txt; pass no '
                          'trainer flags after --.')
      script, _ = sbatch.array_script(opts, _SWEEP.value)
    else:
      script = sbatch.job_script(opts, args)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if _SAVE.value:
    with open(_SAVE.value, 'w') as f:
      f.write(script)
  if _DRY_RUN.value:
    sys.stdout.write(script)
    print('# would run: sbatch --parsable < (the script above)')
    return 0
  return submit(['sbatch', '--parsable'], stdin=script)


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
