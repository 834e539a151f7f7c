"""What every entry point in scripts/ shares: user errors as one line and exit code 1."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar('T')


def reject_extra_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')


def fail(message: str) -> None:
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(1)


def run_or_exit(fn: Callable[[], T], *errors: type[BaseException]) -> T:
  """Runs `fn`; a ValueError (or one of `errors`) ends the process with one line."""
  try:
    return fn()
  except (ValueError, *errors) as e:
    fail(str(e))
    raise  # Unreachable: fail exits.
