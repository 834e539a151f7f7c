"""RUN/train.log: the full text of library warnings and errors, kept off the terminal.

Orbax and the storage layer under it log a failed read or write as pages of stack
traces and tensor-store dumps. The run says what happened in one line of its own; the
details go to RUN/train.log, with the run's own warnings, for whoever needs them.
"""

from __future__ import annotations

import logging
import os
import sys

from lm.run import layout

# Loggers whose records go to the file only: Orbax logs through absl's logger.
_QUIET = ('absl', 'orbax')


class _NotLibraries(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not any(record.name == n or record.name.startswith(n + '.') for n in _QUIET)


def _is_closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def quiet_closed_event_loops() -> None:
  """Sends 'Event loop is closed' errors raised in library callbacks, and asyncio's reports
  of Orbax tasks that failed unobserved, to the log as one line each.

  Orbax's storage layer calls back into asyncio loops that Orbax has already closed
  (after a failed save, and sometimes at exit); Python reports each as an unraisable
  error, dozens of tracebacks about nothing the user can act on. Installed for the
  rest of the process: they can arrive at interpreter exit, after the run has ended.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_closed_loops', False):
    return

  seen = []

  def hook(unraisable) -> None:
    if _is_closed_loop(unraisable.exc_value):
      if not seen:  # One line says it; the rest are the same.
        logging.getLogger('orbax.callbacks').warning(
            'storage callbacks arrived after their event loop closed (not logged again)')
      seen.append(1)
      return
    previous(unraisable)

  hook.quiets_closed_loops = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_OrbaxTaskErrors())


class _OrbaxTaskErrors(logging.Filter):
  """asyncio's 'Task exception was never retrieved' for Orbax's own tasks.

  After a failed save, Orbax leaves tasks whose error nobody awaits; asyncio logs each,
  with its traceback, whenever the garbage collector finds it, which may be after the
  run has said what failed and even after RunLog is closed. One line is logged instead.
  """

  def __init__(self) -> None:
    super().__init__()
    self.seen = False

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' not in record.getMessage():
      return True
    if not self.seen:
      self.seen = True
      logging.getLogger('orbax.callbacks').warning(
          'storage tasks failed after their save was reported (not logged again)')
    return False


class _QuietFileHandler(logging.FileHandler):
  """Stops writing when the disk does (full, read-only) rather than print errors about it."""

  def emit(self, record: logging.LogRecord) -> None:
    if not getattr(self, 'failed', False):
      super().emit(record)

  def handleError(self, record: logging.LogRecord) -> None:
    self.failed = True


class RunLog:
  """Attached to the root logger while a run builds and trains; `close()` detaches it."""

  def __init__(self, workdir: str) -> None:
    self.path = os.path.join(workdir, layout.TRAIN_LOG)
    # delay: the file is made only when there is something to say.
    self._handler = _QuietFileHandler(self.path, encoding='utf-8', delay=True)
    self._handler.setLevel(logging.WARNING)
    self._handler.setFormatter(
        logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    self._filter = _NotLibraries()
    quiet_closed_event_loops()
    root = logging.getLogger()
    self._others = list(root.handlers)
    for handler in self._others:
      handler.addFilter(self._filter)
    root.addHandler(self._handler)

  def close(self) -> None:
    root = logging.getLogger()
    root.removeHandler(self._handler)
    self._handler.close()
    for handler in self._others:
      handler.removeFilter(self._filter)
