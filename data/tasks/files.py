"""Task files: multiple-choice examples as JSON lines, and their choices as token rows.

A task file holds one example per line, a record of record.py ({"context": str,
"choices": [str, ...], "label": int}). Each file is one task, named by its stem.
`read_task` checks every line and names the file and line of the first bad one.

`choice_tokens` splits a context and a choice into tokens with record.py's split, as
lm-evaluation-harness's Hugging Face model does (lm_eval/api/model.py `_encode_pair`,
lm_eval/models/huggingface.py `_loglikelihood_tokens`), so that both score the same
tokens and a model exported with scripts/export_hf.py gets the same log-likelihoods:

- whitespace at the end of the context (`str.rstrip`'s: spaces, newlines, tabs) moves to
  the front of the choice, so a word keeps the token it has in running text;
- the choice's tokens are those of encode(context + choice) after the first
  len(encode(context)) tokens, both with BOS first (the model was trained so; pass
  `add_bos_token=True` to lm-eval);
- the model reads context + choice minus the choice's last token, cut from the left to
  the model's window: row = (context + choice)[-(seq_len + 1):].

lm-eval refuses (asserts on) a choice longer than the window and one whose text merges
whole into the context's last token, leaving it no token of its own; so does this, with
the file and line. Two corners still differ, both from the exported tokenizer rather
than this rule: a context that starts with the text of the BOS piece ('<s>') makes
lm-eval leave BOS out, and a literal U+2581 is bytes to data/tokenizer.py but a space
mark to sentencepiece and tokenizer.json.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import NamedTuple

from data import jsonl
from data.tasks.record import Example, example_from_record, split_continuations
from data.tokenizer import Tokenizer


class ChoiceRow(NamedTuple):
  tokens: list[int]  # At most seq_len + 1: inputs tokens[:-1], targets tokens[1:].
  scored: int  # The last `scored` targets are the choice's tokens.
  cut: bool  # Whether the context lost tokens to the window.


def task_paths(spec: str) -> list[tuple[str, str]]:
  """(task name, path) for each file the comma-separated paths or globs name, in order.

  A task is named by its file's stem; two files with one stem would be ambiguous.
  """
  out: dict[str, str] = {}
  for pattern in [p.strip() for p in spec.split(',') if p.strip()]:
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
      raise ValueError(f'--task: {pattern!r} matched no files')
    for path in paths:
      if not os.path.isfile(path):
        raise ValueError(f'--task: {path} is not a file')
      name = os.path.splitext(os.path.basename(path))[0]
      if name in out and os.path.abspath(out[name]) != os.path.abspath(path):
        raise ValueError(f'--task: two task files named {name!r}: {out[name]} and {path}')
      out[name] = path
  if not out:
    raise ValueError('--task: no task files given')
  return list(out.items())


def read_task(path: str, max_examples: int = 0) -> list[Example]:
  """The file's examples (the first max_examples if > 0); blank lines are skipped."""
  examples = []
  for where, record in _records(path):
    examples.append(example_from_record(record, where))
    if len(examples) == max_examples:
      break
  if not examples:
    raise ValueError(f'{path}: no examples')
  return examples


def _records(path: str) -> Iterator[tuple[str, object]]:
  try:
    for n, record in jsonl.records(path):
      yield f'{path}:{n}', record
  except jsonl.BadLine as e:
    raise ValueError(f'{path}:{e.line}: {e.why}') from e
  except OSError as e:
    raise ValueError(f'{path}: cannot read: {e.strerror}') from e


def choice_tokens(tokenizer: Tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
  """(context ids, choice ids) per choice, split at lm-eval's boundary (module docstring)."""
  bos = [tokenizer.bos_id]
  alone, wholes = split_continuations(tokenizer.encode_batch, example.context,
                                      example.choices)
  context_ids = bos + alone
  out = []
  for i, whole in enumerate(wholes):
    choice_ids = (bos + whole)[len(context_ids):]
    if not choice_ids:  # Merged into the context's last token: nothing left to score.
      raise ValueError(f'{example.where}: choice {i} adds no token to the context')
    out.append((context_ids, choice_ids))
  return out


def choice_rows(tokenizer: Tokenizer, example: Example, seq_len: int) -> list[ChoiceRow]:
  """Per choice, its row: context + choice cut from the left to seq_len + 1 tokens."""
  rows = []
  for i, (context_ids, choice_ids) in enumerate(choice_tokens(tokenizer, example)):
    if len(choice_ids) > seq_len:
      raise ValueError(f'{example.where}: choice {i} is {len(choice_ids)} tokens, longer '
                       f'than the model\'s window of {seq_len}')
    whole = context_ids + choice_ids
    rows.append(ChoiceRow(whole[-(seq_len + 1):], len(choice_ids), len(whole) > seq_len + 1))
  return rows
