"""Confidence intervals for accuracies.

The Wilson score interval (Wilson 1927): for k successes in n trials at z = 1.96,

  centre = (p + z^2/2n) / (1 + z^2/n),  half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).

Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its
coverage near 0 or 1 and at a few hundred examples; over the bootstrap because it is
exact arithmetic (no resampling seed) and cheap.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
  """(low, high) of the Wilson score interval; (0, 1) when n is 0."""
  if n <= 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap_diff(a, b, *, resamples: int = 10_000, seed: int = 0
                          ) -> tuple[float, float, float]:
  """(mean(b - a), 2.5th, 97.5th percentile) of the difference of two per-example 0/1
  scores on the SAME examples (e.g. one checkpoint vs another), by resampling examples
  with replacement (fixed seed: repeatable). Pairing removes the between-example
  variance that two independent Wilson intervals would count twice."""
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f'need two equal-length 1-D score arrays, got {a.shape} and {b.shape}.')
  d = b - a
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  for start in range(0, resamples, 1000):  # Chunks: bounded memory for large n.
    n = min(1000, resamples - start)
    means[start:start + n] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return float(d.mean()), float(lo), float(hi)
