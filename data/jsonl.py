"""JSON lines read a line at a time, so that a bad line is named by its number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


class BadLine(ValueError):
  """Line `line` is not UTF-8 text or not JSON; `why` says which."""

  def __init__(self, line: int, why: str) -> None:
    super().__init__(f'line {line}: {why}')
    self.line, self.why = line, why


def records(path: str, *, encoding: str = 'utf-8',
            errors: str = 'strict') -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of each non-blank line; raises BadLine at the first bad
  one. `encoding` and `errors` decode each line as the file's other reader would."""
  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode(encoding, errors)
      except UnicodeDecodeError as e:
        raise BadLine(n, 'not UTF-8 text') from e
      line = line.strip()  # A line torn mid-string then reads "Unterminated string".
      if not line:
        continue
      try:
        yield n, json.loads(line)
      except json.JSONDecodeError as e:
        raise BadLine(n, f'not JSON: {e.msg}') from e
