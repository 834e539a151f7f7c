"""When a run stops early: a stop request (SIGTERM / SIGINT, or the preemption sync point
under jax.distributed), and too many non-finite steps in a row."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class TrainingAborted(Exception):
  """The run cannot go on (e.g. too many non-finite steps in a row); nothing was saved."""


class StopRequest:
  """SIGTERM / SIGINT: finish the current step, save, wait for the save, return.

  One process: a Python handler sets a flag that the loop reads between steps.
  Several processes (jax.distributed): the signal reaches hosts at different steps, yet
  all must save the same step. `jax.distributed.initialize` starts JAX's preemption sync
  manager, whose notifier catches SIGTERM and agrees on a step with the other hosts;
  installing a Python SIGTERM handler then would replace that notifier, so none is
  installed and the loop asks `reached_preemption_sync_point(step)` instead. (Ctrl-C
  keeps its default there: one host interrupted alone could not agree on a step.)
  """

  def __init__(self, multiprocess: bool = False) -> None:
    self.multiprocess = multiprocess
    self.requested = False
    self._previous: dict[int, Any] = {}

  def __call__(self, signum, frame) -> None:
    log.warning('signal %d: stopping after this step and saving (signal again to kill)',
                signum)
    self.requested = True
    self.uninstall()  # A second signal takes the default action: stop now, unsaved.

  def install(self) -> None:
    if self.multiprocess:
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self)

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Called by every process once per step, with the steps taken so far."""
    if self.multiprocess and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # JAX's preemption service is off: nothing will ever arrive.
        self.multiprocess = False
    return self.requested


class NonFiniteGuard:
  """Counts skipped (NaN/inf) steps in a row from each step's flag, read one step late."""

  def __init__(self, limit: int) -> None:
    self.limit = limit  # 0: skip forever, never abort
    self.in_a_row = 0
    self._unread: tuple[int, jax.Array] | None = None

  def push(self, step: int, nonfinite: jax.Array) -> None:
    """Records step `step`'s flag and reads the previous one (done by now, or nearly)."""
    previous, self._unread = self._unread, (step, nonfinite)
    if previous is not None:
      self._observe(*previous)

  def flush(self) -> None:
    """Reads the last step's flag too (waits for that step)."""
    if self._unread is not None:
      previous, self._unread = self._unread, None
      self._observe(*previous)

  def _observe(self, step: int, nonfinite: jax.Array) -> None:
    if not int(nonfinite):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    log.warning('step %d: loss or gradients are not finite; update skipped', step)
    if self.limit and self.in_a_row >= self.limit:
      raise TrainingAborted(
          f'{self.in_a_row} non-finite steps in a row (steps {step - self.in_a_row + 1}-'
          f'{step}, max_nonfinite_steps={self.limit}): stopped without saving')
