"""What a training run reports while it runs: metrics rows and progress lines.

Train rows go to ``metrics.jsonl``/TensorBoard every ``log_every`` steps and at the last
step. A row's task metrics (``loss``, ``accuracy``, ...) are means over the steps of its
window (since the previous row; ``loss_window`` says how many steps), so one noisy batch
does not make the curve; ``last_step_loss`` is the last step's own loss. Throughput is
over the window's wall time.

Progress lines (the log, not the rows) come at the run's first step, at every row, and
whenever ``log_every_s`` seconds passed without a line, so a slow run shows life early.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import ml_collections
from absl import logging

from research import metrics as metrics_lib

# Host metrics of the step that are not task metrics (or not scalars).
_NOT_TASK = ('weight', 'total_loss', 'z_loss', 'nonfinite', 'skipped', 'grad_norm')


class Progress:
  """Windows the per-step host metrics into rows and progress lines."""

  def __init__(self, config: ml_collections.ConfigDict, writer: metrics_lib.MetricsWriter,
               ramp, schedule: Callable, *, flops_per_token: float, peak_total: float,
               start_step: int, t_start: float):
    self.config, self.writer, self.ramp, self.schedule = config, writer, ramp, schedule
    self.flops_per_token, self.peak_total = flops_per_token, peak_total
    self.start_step, self.t_start = start_step, t_start
    self.last_train: dict[str, Any] = {}
    self.peak_tps = self.peak_mfu = 0.0
    self.time_to_first_step: float | None = None
    self.skipped_steps = 0
    self.last_line_t = time.time()
    self.reset_window(time.time())

  def reset_window(self, now: float) -> None:
    """Starts a new window (after an eval, whose time is not training time)."""
    self.window_t, self.window_steps = now, 0
    self.sums: dict[str, float] = {}

  def record(self, step: int, tokens_seen: int, m: dict[str, Any], now: float) -> None:
    """Adds step ``step``'s host metrics; writes a row / prints a line when due."""
    if int(m['skipped']):
      self.skipped_steps += 1
    if self.time_to_first_step is None:  # The first step's time is mostly compilation.
      self.time_to_first_step = now - self.t_start
    self.window_steps += 1
    for k, v in m.items():
      if k not in _NOT_TASK and getattr(v, 'ndim', 0) == 0:
        self.sums[k] = self.sums.get(k, 0.0) + float(v)
    c = self.config
    row_due = step % c.log_every == 0 or step == c.steps
    first = step == self.start_step + 1
    line_due = first or now - self.last_line_t >= c.log_every_s
    if not (row_due or line_due):
      return
    n = self.window_steps
    dt = (now - self.window_t) / n
    tps = self.ramp.batch_size(step) * c.seq_len / dt
    mfu = tps * self.flops_per_token / self.peak_total
    means = {k: v / n for k, v in self.sums.items()}
    lr = float(self.schedule(step - 1))
    if row_due:
      if step > self.start_step + 1 and not self.ramp.new_size_in(step - n + 1, step):
        # Throughput peaks exclude compiling steps (the first, and a ramp's new sizes).
        self.peak_tps, self.peak_mfu = max(self.peak_tps, tps), max(self.peak_mfu, mfu)
      row = {'step': step, 'split': 'train', **means, 'loss_window': n,
             'last_step_loss': float(m['loss']), 'learning_rate': lr,
             'batch_size': self.ramp.batch_size(step), 'tokens_per_sec': tps, 'mfu': mfu,
             'step_time_s': dt, 'grad_norm': float(m['grad_norm']),
             'tokens_seen': tokens_seen, 'skipped_steps': self.skipped_steps}
      if c.loss.z_loss:
        row['z_loss'] = float(m['z_loss'])
      self.last_train = row
      self.writer.write(row)
    if first:  # Its time is mostly compilation: no rate or ETA from it.
      logging.info('step %d/%d  loss %.4f  lr %.2e  first step %.1fs (compilation included)',
                   step, c.steps, means.get('loss', float('nan')), lr, now - self.t_start)
    else:
      eta = metrics_lib.format_duration(dt * (c.steps - step))
      logging.info('step %d/%d  loss %.4f (mean of %d)  lr %.2e  %.0f tok/s  mfu %.1f%%  '
                   '%.3fs/step  eta %s', step, c.steps, means.get('loss', float('nan')), n,
                   lr, tps, 100 * mfu, dt, eta)
    self.last_line_t = now
    if row_due:
      self.reset_window(now)
