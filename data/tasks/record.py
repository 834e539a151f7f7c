"""The task record: one multiple-choice example, checked once, and the one rule that
splits a context from what continues it.

A record is {"context": str, "choices": [str, ...], "label": int}, the label indexing
the right choice. Task files (files.py) are lines of it, SFT data (data/sft.py) may be,
and the stdlib task maker (stdlib_maker.py) writes it; all three use `Example` and
`example_from_record`, so one mistake gets one message wherever it is made.

The split is lm-evaluation-harness's (lm_eval/api/model.py `_encode_pair`): whitespace at
the end of the context (`str.rstrip`'s) moves to the front of the continuation, so a word
keeps the token it has in running text, and the continuation's tokens are those of the
whole text past the length of the encoded context.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

KEYS = ('context', 'choices', 'label')


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  label: int
  where: str = ''  # 'path:line' of a record read from a file, for errors.
  files: tuple[str, ...] = ()  # A made example's source files, the context's first.

  def to_json(self) -> str:
    """The record as one JSON line (ASCII escapes keep it one line for every reader)."""
    return json.dumps({'context': self.context, 'choices': list(self.choices),
                       'label': self.label})


def example_from_record(record: Any, where: str) -> Example:
  """The record as an Example; a ValueError naming `where` and the bad key otherwise."""
  def bad(why: str) -> ValueError:
    return ValueError(f'{where}: {why}')

  if not isinstance(record, Mapping):
    raise bad(f'expected a JSON object with {", ".join(KEYS)}, got {type(record).__name__}')
  missing = [k for k in KEYS if record.get(k) is None]  # Columnar readers fill None.
  if missing:
    raise bad(f'missing key {", ".join(missing)}')
  context, choices, label = (record[k] for k in KEYS)
  if not isinstance(context, str):
    raise bad(f'"context" must be a string, got {type(context).__name__}')
  if not isinstance(choices, list) or not choices:
    raise bad('"choices" must be a non-empty list of strings')
  for i, choice in enumerate(choices):
    if not isinstance(choice, str) or not choice:
      raise bad(f'"choices" must be a non-empty list of strings; choice {i} is {choice!r}')
    if choice in choices[:i]:  # Two classes of one text: scores and metrics would twin.
      raise bad(f'"choices" must differ; choice {i} repeats choice '
                f'{choices.index(choice)}, {choice!r}')
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
    raise bad(f'"label" must index "choices" (0 to {len(choices) - 1}), got {label!r}')
  return Example(context, tuple(choices), label, where)


def split_context(context: str) -> tuple[str, str]:
  """(the context, its trailing whitespace), which moves to the continuation's front."""
  stripped = context.rstrip()
  return stripped, context[len(stripped):]


def split_continuations(encode: Callable[[list[str]], list[list[int]]], context: str,
                        continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
  """(the context's own ids, the whole ids of context + each continuation). A
  continuation's tokens are its whole ids past the context's length; `encode` maps a
  list of strings to their ids."""
  stripped, spill = split_context(context)
  ids = encode([stripped] + [stripped + spill + c for c in continuations])
  return list(ids[0]), [list(whole) for whole in ids[1:]]
