"""MinHash settings from a similarity threshold and a number of hashes.

LSH with b bands of r rows (b * r hashes) makes two documents of Jaccard similarity s
candidates with probability 1 - (1 - s^r)^b, an S-curve whose steepest point is near
(1/b)^(1/r). Given a threshold and a hash budget, `bands_rows` picks the (b, r) whose
curve best separates the two sides (the sum of the false-positive area below the
threshold and the false-negative area above it, equally weighted, as datasketch's
optimal parameters do). The defaults, 112 hashes at 0.7, give 12 bands of 9 rows (FineWeb
used 14 of 8 with the same budget: a curve centred on 0.72).
"""

from __future__ import annotations

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig


def candidate_probability(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray:
  return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def bands_rows(threshold: float, num_hashes: int) -> tuple[int, int]:
  if not 0.0 < threshold < 1.0:
    raise ValueError(f'--minhash_threshold: must be in (0, 1) (got {threshold})')
  if num_hashes < 1:
    raise ValueError(f'--minhash_hashes: must be positive (got {num_hashes})')
  grid = np.linspace(0.0, 1.0, 1001)
  below, above = grid <= threshold, grid > threshold
  best, best_error = (1, 1), np.inf
  for bands in range(1, num_hashes + 1):
    rows = num_hashes // bands
    p = candidate_probability(grid, bands, rows)
    error = np.trapezoid(p[below], grid[below]) + np.trapezoid(1.0 - p[above], grid[above])
    if error < best_error - 1e-12:
      best, best_error = (bands, rows), error
  return best


def config(threshold: float, num_hashes: int, n_grams: int, seed: int = 1) -> MinhashConfig:
  if n_grams < 1:
    raise ValueError(f'--minhash_ngrams: must be positive (got {n_grams})')
  bands, rows = bands_rows(threshold, num_hashes)
  return MinhashConfig(n_grams=n_grams, num_buckets=bands, hashes_per_bucket=rows, seed=seed)
