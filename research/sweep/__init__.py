"""Ablation sweeps: plan the runs of a config's ``sweep()``, run them, collect results.

One concern per module; this package re-exports their public names (``from research
import sweep; sweep.make_plan(...)``):

  plan.py     sweep() entries -> Run/Plan (names, commands), sweep.json, commands.txt,
              --only selection
  status.py   a run's state on disk (ok, failed, pending...), sweep_status.json, the
              --dry_run listing
  runner.py   the trainers as subprocesses, N at a time; signals
  results.py  per-run results, means over seeds, results.{md,csv}, plots
  tables.py   CSV and markdown formatting

A sweep directory ``DIR`` holds::

  DIR/sweep.json        the plan: config, extra args, seeds, keys, and every run
                        (index, name, setting, label, overrides, seed, workdir, command)
  DIR/commands.txt      line i+1 = the shell-quoted command of run i (Slurm array task i)
  DIR/<run>/            the trainer's workdir (config.json, metrics.jsonl, summary.json...),
                        named index-hash (``003-a1b2c3``, ``003-a1b2c3-seed1``)
  DIR/<run>/train.log   the trainer's stdout+stderr, appended per attempt
  DIR/<run>/sweep_status.json   status, exit code and error of the last local attempt
  DIR/results.md, DIR/results.csv   one row per run (per setting with seeds)
  DIR/results_runs.csv  with seeds: one row per run
  DIR/*.png             plots (research/plots.py)

A run is finished when its ``summary.json`` exists; rerunning a sweep skips finished
runs and reruns the others (the trainer resumes from its checkpoint). Commands are
argv lists end to end; ``commands.txt`` quotes each argument with ``shlex.quote``.
"""

from research.run_logs import METRICS, SUMMARY, curve, read_json, read_metrics
from research.sweep.plan import (COMMANDS, PLAN, Plan, Run, SweepError, canonical,
                                 check_overrides, extra_keys, format_value, label,
                                 make_plan, parse_seeds, read_plan, run_name, select,
                                 seeded_label, sweep_entries, train_command, write_plan)
from research.sweep.results import aggregate, collect, run_result
from research.sweep.runner import LOG, Interrupted, error_from_log, execute
from research.sweep.status import (FAILED, INCOMPLETE, INTERRUPTED, OK, PENDING, PREEMPTED,
                                   STATUS, describe_plan, is_finished, plan_state, run_state,
                                   write_status)
from research.sweep.tables import METRIC_COLUMNS, STD_COLUMNS, table_columns, to_markdown
