"""One trainer per run folder: an exclusive `flock` on RUN/.lock while a run trains.

The kernel drops the lock when its process dies, however it dies, so a killed run never
leaves a stale lock behind. The file records who holds it (pid, host, start time) so a
second trainer can say whom it is waiting for. Under jax.distributed only process 0
takes the lock; every process learns whether it got it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax

from lm import distributed
from lm.run import layout


class RunLock:
  """Holds RUN/.lock from `acquire()` until `release()` or the process's end."""

  def __init__(self, workdir: str) -> None:
    self.workdir = workdir
    self.path = os.path.join(workdir, layout.LOCK)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Process 0 takes the lock; every process raises the same ValueError if it cannot."""
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
      except ValueError as e:
        error = str(e)
      except OSError as e:
        error = f'workdir: cannot lock {self.path}: {e.strerror or e}'
    errors = distributed.gather_json(error)
    if errors[0]:
      raise ValueError(errors[0])

  def _take(self) -> None:
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise ValueError(f'workdir: {self.workdir} is a file, not a folder')
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(os.read(fd, 4096))
      os.close(fd)
      raise ValueError(f'{self.workdir} is in use by another trainer ({holder}); wait for '
                       'it to finish or stop it, or use another workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _describe(raw: bytes) -> str:
  try:
    holder = json.loads(raw.decode())
    return f'pid {holder["pid"]} on {holder["host"]}, since {holder["since"]}'
  except (ValueError, KeyError, TypeError):
    return 'holder unknown'
