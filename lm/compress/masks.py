"""Which weights a pruned projection keeps: masks from scores, as 2-D (inputs x outputs).

Every prunable kernel is viewed as a matrix W[d_in, d_out] (q (D, N, H) as (D, N*H), o
(N, H, D) as (N*H, D), gate / up (D, F), down (F, D)). A weight's output column competes
only with the weights of the same output, as in Wanda (its "per output" comparison
group); SparseGPT and magnitude use the same groups here, so every method removes
exactly the same number of weights from every output:

  Sparsity(fraction=s)   round(s * d_in) zeros in each output column, so each matrix is
                         exactly that fraction sparse whenever s * d_in is whole.
  Sparsity(n=N, m=M)     N:M semi-structured sparsity (NVIDIA's): of every M consecutive
                         inputs of an output, at most N are kept (M - N zeros); 2:4 is 50%.

Ties are broken by position (the lower input index is pruned first), so a mask is the
same on every machine.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """What to prune: an unstructured fraction, or an N:M pattern (n kept of every m)."""

  fraction: float = 0.0
  n: int = 0
  m: int = 0

  @classmethod
  def parse(cls, sparsity: float | None, pattern: str | None) -> Sparsity:
    """From --sparsity or --pattern (exactly one); ValueError naming the flag."""
    if (sparsity is None) == (not pattern):
      raise ValueError('give exactly one of --sparsity=F (a fraction in (0, 1)) or '
                       '--pattern=N:M (e.g. 2:4)')
    if pattern:
      found = re.fullmatch(r'(\d+):(\d+)', pattern.strip())
      if not found or not 0 < int(found[1]) < int(found[2]):
        raise ValueError(f'--pattern must be N:M with 0 < N < M (e.g. 2:4 or 4:8), got '
                         f'{pattern!r}')
      return cls(n=int(found[1]), m=int(found[2]))
    if not 0.0 < sparsity < 1.0:
      raise ValueError(f'--sparsity must be in (0, 1), got {sparsity}')
    return cls(fraction=float(sparsity))

  @property
  def structured(self) -> bool:
    return self.m > 0

  def describe(self) -> str:
    return f'{self.n}:{self.m}' if self.structured else f'{self.fraction:g}'

  def zeros_per_output(self, d_in: int) -> int:
    """How many inputs of each output are pruned."""
    if self.structured:
      return d_in // self.m * (self.m - self.n)
    return int(round(self.fraction * d_in))

  def check(self, name: str, d_in: int) -> None:
    """ValueError when the pattern cannot tile this matrix's inputs."""
    if self.structured and d_in % self.m:
      raise ValueError(f'--pattern={self.describe()}: {name} has {d_in} inputs, not a '
                       f'multiple of {self.m}')

  def keep(self, scores_IxO: np.ndarray) -> np.ndarray:
    """The mask (True = kept) that prunes the lowest scores of each output's group."""
    d_in, d_out = scores_IxO.shape
    if self.structured:
      groups = scores_IxO.reshape(d_in // self.m, self.m, d_out)
      return _keep_top(groups, axis=1, drop=self.m - self.n).reshape(d_in, d_out)
    return _keep_top(scores_IxO, axis=0, drop=self.zeros_per_output(d_in))


def _keep_top(scores: np.ndarray, axis: int, drop: int) -> np.ndarray:
  """True everywhere but at the `drop` smallest scores along `axis` (stable: ties go to
  the lower index)."""
  order = np.argsort(scores, axis=axis, kind='stable')
  keep = np.ones(scores.shape, bool)
  np.put_along_axis(keep, np.take(order, np.arange(drop), axis=axis), False, axis=axis)
  return keep


def as_matrix(name: str, kernel: np.ndarray) -> np.ndarray:
  """The kernel as W[d_in, d_out] (a view where numpy can give one)."""
  if name == 'o':  # (N, H, D): the heads' outputs are the inputs.
    return kernel.reshape(-1, kernel.shape[-1])
  return kernel.reshape(kernel.shape[0], -1)


def zero_fraction(kernel: np.ndarray) -> float:
  return float(np.mean(np.asarray(kernel) == 0))
