"""Instruction and task fine-tuning data (data.format='sft'): records, template, tokens.

A record is one JSON line in one of three forms:
  {"prompt": str, "response": str}
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  {"context": str, "choices": [str, ...], "label": int}   (a task file: the right choice
                                                           is the response)
Each becomes a list of messages, and the chat template turns those into tokens:

  BOS, then each message's content exactly as written, then EOS after each assistant
  message.

The template adds no text of its own (no role names): a prompt says where its answer
begins the way task files do (`...\\nAnswer:` and ` yes`), so fine-tuning and task
scoring (lm/eval/tasks.py) see the same strings, and a model pretrained on plain text needs
no new tokens. CHAT_TEMPLATE is the same template for Hugging Face tokenizers
(`tokenizer_config.json`), which give the same ids with `apply_chat_template`.

Tokens. The text between two EOS (or from BOS) is encoded as one piece, as a Hugging Face
tokenizer encodes the rendered template; an assistant message's tokens are those past
the encoded text before it (`split_pair`, lm-evaluation-harness's rule). Only they,
and the EOS after them, are trained on: the loss mask. An example longer than
seq_len + 1 tokens is cut at the end (truncated); one whose prompt alone leaves no
response token inside seq_len + 1 is skipped. `count` reports both before a run starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data.tasks.record import example_from_record, split_continuations

ROLES = ('system', 'user', 'assistant')
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


class RecordError(ValueError):
  """A record that is not one of the three forms; the message names where it is."""


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
  """The record's messages; RecordError naming `where` (file:line) if it has none."""
  def bad(why: str) -> RecordError:
    return RecordError(f'{where}: {why}')

  if not isinstance(record, Mapping):
    raise bad(f'expected a JSON object, got {type(record).__name__}')
  present = lambda key: record.get(key) is not None  # noqa: E731 (columnar readers fill None)
  if present('messages'):
    messages = record['messages']
    if not isinstance(messages, list) or not messages:
      raise bad('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or m.get('role') not in ROLES:
        raise bad(f'messages[{i}] needs a "role" of {", ".join(ROLES)}')
      if not isinstance(m.get('content'), str):
        raise bad(f'messages[{i}] needs a "content" string')
      out.append({'role': m['role'], 'content': m['content']})
  elif present('prompt') or present('response'):
    for key in ('prompt', 'response'):
      if not isinstance(record.get(key), str):
        raise bad(f'"{key}" must be a string')
    out = [{'role': 'user', 'content': record['prompt']},
           {'role': 'assistant', 'content': record['response']}]
  elif present('context') or present('choices'):
    try:
      example = example_from_record(record, where)
    except ValueError as e:
      raise RecordError(str(e)) from None
    out = [{'role': 'user', 'content': example.context},
           {'role': 'assistant', 'content': example.choices[example.label]}]
  else:
    raise bad('a record needs "prompt" and "response", "messages", or "context", '
              f'"choices" and "label"; it has {", ".join(sorted(record)) or "no keys"}')
  if out[-1]['role'] != 'assistant' or not out[-1]['content']:
    raise bad('the last message must be a non-empty "assistant" one: the response')
  return out


def record_text(record: Any, where: str) -> str:
  """The document a record becomes in the pipeline: its messages as canonical JSON."""
  return json.dumps(to_messages(record, where), ensure_ascii=False, sort_keys=True)


def plain_text(text: str) -> str:
  """A record_text document's words, as a tokenizer is trained on them."""
  return ''.join(m['content'] for m in json.loads(text))


def split_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), split by data/tasks/record.py's rule (task
  scoring's too): the pair is encoded whole, as a Hugging Face tokenizer encodes the
  rendered template, and cut at the length of the encoded context. `encode` maps a list
  of strings to their ids.
  """
  head, (whole,) = split_continuations(encode, context, [continuation])
  return whole[:len(head)], whole[len(head):]


def reply_prompt(messages: Sequence[Mapping[str, str]], encode, bos_id: int,
                 eos_id: int) -> list[int]:
  """The ids a model continues to answer `messages`: the template as training renders it,
  then the text after the last assistant message, encoded as training encoded a prompt
  (its trailing whitespace belongs to the reply, split_pair's rule). `encode` maps a list
  of strings to their ids."""
  answered = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=-1)
  ids = [bos_id]
  if answered >= 0:
    done = encode_messages(messages[:answered + 1], encode, bos_id, eos_id, 2 ** 62)
    ids = done.rows[:, 0].tolist()
  tail = ''.join(m['content'] for m in messages[answered + 1:])
  if tail:
    ids += split_continuations(encode, tail, [])[0]
  return ids


@dataclasses.dataclass
class Encoded:
  """An example's tokens (int32 [N, 2]: id, trained-on flag) and what happened to it."""

  rows: np.ndarray
  truncated: bool = False
  skipped: bool = False


def encode_messages(messages: Sequence[Mapping[str, str]], encode, bos_id: int, eos_id: int,
                    max_tokens: int) -> Encoded:
  """The template's tokens and loss flags, cut to `max_tokens` (seq_len + 1)."""
  ids, flags = [bos_id], [0]
  pending = ''  # Text since the last EOS: one piece, encoded whole.
  for m in messages:
    if m['role'] != 'assistant':
      pending += m['content']
      continue
    head, tail = split_pair(encode, pending, m['content'])
    ids += head + tail + [eos_id]
    flags += [0] * len(head) + [1] * (len(tail) + 1)
    pending = ''
  # Trailing non-assistant messages train nothing; to_messages does not let them through.
  rows = np.stack([np.asarray(ids, np.int32), np.asarray(flags, np.int32)], axis=1)
  if len(rows) <= max_tokens:
    return Encoded(rows)
  rows = rows[:max_tokens]
  # The first trained token is a target only from position 1 on: keep at least one.
  if not rows[1:, 1].any():
    return Encoded(np.zeros((0, 2), np.int32), skipped=True)
  return Encoded(rows, truncated=True)


def encode_texts(texts: Iterable[str], encode, bos_id: int, eos_id: int,
                 max_tokens: int) -> list[Encoded]:
  """record_text documents as examples (see encode_messages), in one call of `encode`."""
  examples = [json.loads(t) for t in texts]
  wanted: set[str] = set()

  def note(strings):
    wanted.update(strings)
    return [[] for _ in strings]

  for messages in examples:  # A dry run collects every string to encode.
    encode_messages(messages, note, bos_id, eos_id, max_tokens)
  order = sorted(wanted)
  known = dict(zip(order, encode(order)))
  lookup = lambda strings: [known[s] for s in strings]  # noqa: E731
  return [encode_messages(m, lookup, bos_id, eos_id, max_tokens) for m in examples]


@dataclasses.dataclass
class Counts:
  """What `count` found: examples, and those truncated or skipped for length."""

  examples: int = 0
  truncated: int = 0
  skipped: int = 0
  first_skipped: str = ''

  def line(self, max_tokens: int) -> str:
    return (f'{self.examples} examples; {self.truncated} longer than {max_tokens} tokens '
            f'(seq_len + 1) are truncated at the end; {self.skipped} whose prompt leaves '
            f'no response token within them are skipped'
            + (f' (first: {self.first_skipped})' if self.first_skipped else ''))


def count(docs: Iterable[tuple[str, str]], encode, bos_id: int, eos_id: int,
          max_tokens: int) -> Counts:
  """Encodes (key, record_text) documents once and counts what training will do."""
  out = Counts()
  it = iter(docs)
  while chunk := list(itertools.islice(it, 1024)):
    encoded = encode_texts([text for _, text in chunk], encode, bos_id, eos_id, max_tokens)
    for (key, _), e in zip(chunk, encoded):
      out.examples += 1
      out.truncated += e.truncated
      out.skipped += e.skipped
      if e.skipped and not out.first_skipped:
        name, _, row = key.rpartition(':')  # A file's rows are keyed FILE:ROW from 0.
        out.first_skipped = f'{name} line {int(row) + 1}' if row.isdigit() else key
  return out
