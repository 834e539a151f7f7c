"""The compute frontier of a sweep and the power law L(C) = E + A * C^-alpha fitted to it.

numpy only: the fit is three parameters, solved by a scan over alpha (E and A are then a
linear least-squares problem) refined with Levenberg-Marquardt, and its standard errors
come from the Jacobian at the optimum, s^2 (J^T J)^-1, as scipy's curve_fit gives them.
scipy is not a dependency of the project, and this is the one place that would use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

NUM_PARAMS = 3  # E, A, alpha
MIN_BUDGETS = NUM_PARAMS + 1  # At least one residual degree of freedom for the errors.


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = E + A * C^-alpha, with standard errors of each parameter."""

  E: float  # Capitals, as in the formula.
  A: float
  alpha: float
  E_err: float
  A_err: float
  alpha_err: float
  rmse: float  # Root mean square residual, in loss units.
  points: int

  def __call__(self, c: np.ndarray | float) -> np.ndarray | float:
    return self.E + self.A * np.power(c, -self.alpha)

  @property
  def determined(self) -> bool:
    """Whether E and alpha are known to better than their own size (and E >= 0, as a
    loss's floor must be): else the budgets do not pin the curve down. A is not judged:
    it is the curve's height at C = 1 FLOP, a dozen decades below any budget, so its
    error is alpha's times ln C (about 28 at 1e12) whenever alpha has any."""
    pairs = ((self.E, self.E_err), (self.alpha, self.alpha_err))
    return self.E >= 0 and all(math.isfinite(err) and err < abs(v) for v, err in pairs)

  def describe(self) -> str:
    """`L(C) = E + A * C^-alpha: E = 3.2 ± 0.1, ...` in one line, saying so when the
    fit is not determined."""
    line = (f'L(C) = E + A * C^-alpha over {self.points} compute budgets: '
            f'E = {self.E:.4g} ± {self.E_err:.2g}, A = {self.A:.4g} ± {self.A_err:.2g}, '
            f'alpha = {self.alpha:.4g} ± {self.alpha_err:.2g} (rmse {self.rmse:.3g})')
    return line if self.determined else (
        line + "; poorly determined (E's or alpha's error exceeds its value, or E < 0): these "
        'budgets do not pin the curve down')


def best_per_budget(flops: Sequence[float], losses: Sequence[float | None], *,
                    rel_tol: float = 1e-3) -> list[int]:
  """Indices of the lowest-loss point of each compute budget, by increasing compute.

  A budget is a set of points whose FLOPs agree within `rel_tol` (say, one model size
  trained for the same steps at several learning rates). Points without a loss (not
  finished, or diverged) take no part.
  """
  order = sorted((i for i, loss in enumerate(losses) if _finite(loss)), key=lambda i: flops[i])
  budgets: list[list[int]] = []
  for i in order:
    if budgets and flops[i] <= flops[budgets[-1][0]] * (1 + rel_tol):
      budgets[-1].append(i)
    else:
      budgets.append([i])
  return [min(budget, key=lambda i: losses[i]) for budget in budgets]


def compute_frontier(flops: Sequence[float], losses: Sequence[float | None], *,
                     rel_tol: float = 1e-3) -> list[int]:
  """Indices of the compute-efficient frontier, by increasing compute: the best point of
  each budget (`best_per_budget`) that is lower than every cheaper budget's best. A
  budget whose best is no better than a cheaper one's lies above the frontier: more
  compute spent for nothing."""
  frontier: list[int] = []
  for i in best_per_budget(flops, losses, rel_tol=rel_tol):
    if not frontier or losses[i] < losses[frontier[-1]]:
      frontier.append(i)
  return frontier


def _finite(x: float | None) -> bool:
  return x is not None and math.isfinite(x)


def underdetermined(points: int) -> str | None:
  """Why a fit to `points` budgets would say nothing, or None if it can be made."""
  if points >= MIN_BUDGETS:
    return None
  return (f'power law not fitted: {points} compute budget(s) for {NUM_PARAMS} parameters '
          f'(E, A, alpha) is underdetermined; it needs at least {MIN_BUDGETS} budgets')


def _linear_ea(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float, float]:
  """For a fixed alpha the model is linear in E and A: their least squares and the SSE."""
  basis = np.stack([np.ones_like(x), x ** -alpha], axis=1)
  (e, a), *_ = np.linalg.lstsq(basis, y, rcond=None)
  return float(e), float(a), float(np.sum((basis @ (e, a) - y) ** 2))


def _residuals_jacobian(theta: np.ndarray, x: np.ndarray, y: np.ndarray):
  e, a, alpha = theta
  p = x ** -alpha
  r = e + a * p - y
  jac = np.stack([np.ones_like(x), p, -a * p * np.log(x)], axis=1)
  return r, jac


def _levenberg_marquardt(theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                         iters: int = 200) -> np.ndarray:
  """Minimises the squared residuals from `theta`; damping grows on every failed step."""
  lam = 1e-3
  r, jac = _residuals_jacobian(theta, x, y)
  for _ in range(iters):
    jtj = jac.T @ jac
    step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -jac.T @ r)
    r_new, jac_new = _residuals_jacobian(theta + step, x, y)
    if r_new @ r_new < r @ r:
      converged = r @ r - r_new @ r_new <= 1e-15 * max(r @ r, 1e-30)
      theta, r, jac, lam = theta + step, r_new, jac_new, lam / 3
      if converged:
        break
    else:
      lam *= 4
      if lam > 1e12:
        break
  return theta


def fit_power_law(compute: Sequence[float], losses: Sequence[float]) -> PowerLaw:
  """Least-squares fit of L(C) = E + A * C^-alpha to (compute, loss) points.

  Compute is divided by its geometric mean while fitting, so the Jacobian's columns are
  of similar size whatever the FLOPs' magnitude; A and its error are given back in the
  units of C itself. Raises ValueError with fewer than MIN_BUDGETS points.
  """
  c, y = np.asarray(compute, np.float64), np.asarray(losses, np.float64)
  reason = underdetermined(len(c))
  if reason:
    raise ValueError(reason)
  c0 = float(np.exp(np.mean(np.log(c))))
  x = c / c0
  scan = [(_linear_ea(x, y, alpha), alpha) for alpha in np.geomspace(1e-3, 3.0, 300)]
  (e, a, _), alpha = min(scan, key=lambda s: s[0][2])
  theta = _levenberg_marquardt(np.array([e, a, alpha]), x, y)
  r, jac = _residuals_jacobian(theta, x, y)
  dof = len(x) - NUM_PARAMS
  cov = (r @ r / dof) * np.linalg.inv(jac.T @ jac)
  e, a0, alpha = (float(v) for v in theta)
  # A * C^-alpha = a0 * (C / c0)^-alpha, so A = a0 * c0^alpha: its error by the delta
  # method, through the covariance of a0 and alpha. inv, not pinv: a near-singular J^T J
  # (say alpha -> 0, where E and A trade off) must show as huge errors, not hide them.
  a = a0 * c0 ** alpha
  grad = np.array([0.0, c0 ** alpha, a * math.log(c0)])
  a_var = float(grad @ cov @ grad)
  return PowerLaw(E=e, A=a, alpha=alpha, E_err=_sqrt(cov[0, 0]), A_err=_sqrt(a_var),
                  alpha_err=_sqrt(cov[2, 2]), rmse=float(np.sqrt(r @ r / len(x))),
                  points=len(x))


def _sqrt(v: float) -> float:
  return math.sqrt(v) if v >= 0 else math.nan
