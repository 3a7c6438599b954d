"""Optional Weights & Biases sink for the metrics rows (``wandb.project`` set).

Not a dependency of the default install: ``pip install wandb`` when you want it. The
default ``wandb.mode='offline'`` writes the run under ``WORKDIR/wandb/`` without any
network (``wandb sync WORKDIR/wandb/offline-run-*`` uploads it later); ``online``
streams it. The run id is derived from the workdir, so a resumed run continues the same
W&B run. Rows are logged at their step, keyed ``split/metric`` like TensorBoard's.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import ml_collections

from research.config import ConfigError

MODES = ('offline', 'online', 'disabled')


def validate(w: ml_collections.ConfigDict) -> None:
  if w.mode not in MODES:
    raise ConfigError(f'wandb.mode={w.mode!r} is unknown; use one of {MODES}.')
  if w.project:
    try:
      import wandb  # noqa: F401
    except ImportError:
      raise ConfigError('wandb.project is set but wandb is not installed; pip install wandb '
                        '(or set wandb.project=\'\').') from None


class WandbSink:
  """Logs metric rows and the final summary to one W&B run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    import wandb
    w = config.wandb
    workdir = os.path.abspath(workdir)
    directory = os.path.expanduser(w.dir) if w.dir else os.path.join(workdir, 'wandb')
    os.makedirs(directory, exist_ok=True)
    run_id = hashlib.sha256(workdir.encode()).hexdigest()[:16]
    self._run = wandb.init(project=w.project, entity=w.entity or None,
                           name=w.run_name or os.path.basename(workdir), id=run_id,
                           resume='allow', dir=directory, mode=w.mode,
                           config=config.to_dict(), settings=wandb.Settings(silent=True))

  def write(self, row: dict[str, Any]) -> None:
    split = row.get('split', 'train')
    values = {f'{split}/{k}': v for k, v in row.items()
              if k not in ('step', 'split') and isinstance(v, (int, float))}
    self._run.log(values, step=int(row['step']))

  def summarize(self, metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self._run.summary[k] = v

  def close(self) -> None:
    self._run.finish()
