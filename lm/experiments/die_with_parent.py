"""Runs a command that stops, as SIGTERM stops it, when its parent dies (Linux).

    python lm/experiments/die_with_parent.py PARENT_PID COMMAND...

The sweep starts each point through this, so a sweep killed without a word (SIGKILL, out
of memory) leaves no train.py training on unwatched and holding its run folder. The
kernel's parent-death signal is sent again each time a dying process's threads hand the
child on, and train.py takes a second SIGTERM as "stop unsaved"; so this process, with
one thread, takes those signals (as SIGKILL), and its child gets exactly one SIGTERM,
when this process dies. Signals sent to this process are passed on one for one, and it
exits as the command does. Standard library only: it runs as a plain file.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int, parent: int) -> None:
  """Asks for `sig` when the parent dies; exits at once if it already has."""
  ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
  if os.getppid() != parent:  # Gone before the request took hold.
    os._exit(1)


def main(argv: list[str]) -> int:
  parent, command = int(argv[0]), argv[1:]
  _die_with_parent(signal.SIGKILL, parent)
  me = os.getpid()
  child = os.fork()
  if child == 0:
    _die_with_parent(signal.SIGTERM, me)
    os.execv(command[0], command)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, _: os.kill(child, s))
  _, status = os.waitpid(child, 0)  # Retried after each signal passed on (PEP 475).
  code = os.waitstatus_to_exitcode(status)
  return code if code >= 0 else 128 - code  # Killed by signal N: the shell's 128 + N.


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
