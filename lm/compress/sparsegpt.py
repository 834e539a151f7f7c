"""Scores and weight updates of the three unstructured methods, on one matrix W[d_in, d_out].

  magnitude  |W|: no calibration.
  wanda      |W_io| * ||X_i||: the weight times the norm of its input over the
             calibration tokens (Sun et al. 2023); weights are not changed.
  sparsegpt  the optimal-brain-surgeon sweep of Frantar & Alistarh (2023): inputs are
             pruned one at a time, left to right, and the error each removal makes in
             X W is pushed onto the inputs not yet visited through the inverse of the
             damped Hessian H = X^T X; the mask of each block of columns is chosen on
             w^2 / [H^-1]_ii^2 as the sweep reaches it.

`H` is X^T X summed over calibration tokens (float64); Wanda reads only its diagonal.
"""

from __future__ import annotations

import numpy as np

from lm.compress.masks import Sparsity

DAMP = 0.01  # Of the mean diagonal, as in the SparseGPT paper.
BLOCK = 128  # Columns whose masks are chosen together.


def magnitude_scores(w_IxO: np.ndarray) -> np.ndarray:
  return np.abs(w_IxO)


def wanda_scores(w_IxO: np.ndarray, h_IxI: np.ndarray) -> np.ndarray:
  return np.abs(w_IxO) * np.sqrt(np.maximum(np.diag(h_IxI), 0.0))[:, None]


def prune_by_scores(w_IxO: np.ndarray, scores_IxO: np.ndarray,
                    sparsity: Sparsity) -> tuple[np.ndarray, np.ndarray]:
  """(W with the pruned weights zeroed, the mask of kept weights)."""
  keep = sparsity.keep(scores_IxO)
  return np.where(keep, w_IxO, 0).astype(w_IxO.dtype), keep


def sparsegpt(w_IxO: np.ndarray, h_IxI: np.ndarray,
              sparsity: Sparsity) -> tuple[np.ndarray, np.ndarray]:
  """(the updated W with exactly the asked zeros per output, the mask of kept weights)."""
  d_in = w_IxO.shape[0]
  w = np.array(w_IxO, np.float64).T  # Outputs x inputs: the sweep walks the columns.
  h = np.array(h_IxI, np.float64)
  dead = np.diag(h) == 0  # An input never active: its weights do nothing, so go first.
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h[np.diag_indices(d_in)] += DAMP * np.mean(np.diag(h))
  # The upper Cholesky factor of H^-1: row i holds what removing input i does to inputs
  # i, i+1, ... once inputs before i are fixed.
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  keep = np.ones_like(w, bool)
  target = sparsity.zeros_per_output(d_in)
  for start in range(0, d_in, BLOCK):
    end = min(start + BLOCK, d_in)
    if not sparsity.structured:  # This block's share of each output's zeros.
      drop = round(target * end / d_in) - round(target * start / d_in)
      score = w[:, start:end] ** 2 / np.diag(u)[start:end] ** 2
      keep[:, start:end] = _keep_per_row(score, drop)
    err = np.zeros((w.shape[0], end - start))
    for i in range(start, end):
      if sparsity.structured and i % sparsity.m == 0:
        group = slice(i, i + sparsity.m)
        score = w[:, group] ** 2 / np.diag(u)[group] ** 2
        keep[:, group] = _keep_per_row(score, sparsity.m - sparsity.n)
      q = np.where(keep[:, i], w[:, i], 0.0)
      err[:, i - start] = (w[:, i] - q) / u[i, i]
      w[:, i:end] -= np.outer(err[:, i - start], u[i, i:end])
      w[:, i] = q
    w[:, end:] -= err @ u[start:end, end:]
  return np.where(keep, w, 0.0).T.astype(w_IxO.dtype), keep.T


def _keep_per_row(score: np.ndarray, drop: int) -> np.ndarray:
  """False at the `drop` lowest scores of each row (ties: the lower column first)."""
  order = np.argsort(score, axis=1, kind='stable')[:, :drop]
  keep = np.ones(score.shape, bool)
  np.put_along_axis(keep, order, False, axis=1)
  return keep


def reconstruction_error(w_IxO: np.ndarray, pruned_IxO: np.ndarray, h_IxI: np.ndarray) -> float:
  """sum over calibration tokens of ||x W - x W'||^2, from H = X^T X."""
  d = np.asarray(w_IxO, np.float64) - np.asarray(pruned_IxO, np.float64)
  return float(np.einsum('io,ij,jo->', d, h_IxI, d))
