"""A help desk for the Python standard library, made from held-out stdlib files.

Two kinds of question, as a user of a customer-service assistant asks them, each a task
example ({"context", "choices", "label"}) so that the same file fine-tunes a model
(data.format='sft' trains on the context as the prompt and the right choice as the
reply) and scores it (scripts/eval.py --task, accuracy):

  'What is the json.decoder module for?'      four answers: the first sentence of that
                                               module's docstring and of three others'
  'Which package is this code from?' + code    the eight 'It is from the X package.'
                                               answers, one per package of PACKAGES

Every answer starts with a newline (the separator lives in the choice, as in the other
tasks), so a model fine-tuned on them replies on a line of its own, and the chat page
gets the same reply to the same question typed by hand.

Each held-out file goes to one side, train or test, for both kinds: a package's files as
stdlib_maker.split_files splits them, the others by a digest of their path. Nothing is
random; picks are ranked by digests as in stdlib_maker.
"""

import ast
import heapq
import re
import warnings
from collections.abc import Sequence

from data.tasks import stdlib_maker
from data.tasks.record import Example
from data.tasks.stdlib_maker import Doc, rank

HELPDESK_TRAIN = 'stdlib_helpdesk_train'
HELPDESK_TEST = 'stdlib_helpdesk_test'
PACKAGE_QUESTION = 'Which package is this code from?\n```\n'
PACKAGE_ANSWERS = tuple(f'\nIt is from the {p} package.' for p in stdlib_maker.PACKAGES)
NUM_PURPOSES = 4  # Choices of a 'What is X for?' question.

# A purpose is one sentence a reader can tell apart from others: words, not a ruler or
# a licence line, short enough for the tiny config's window.
_MIN_SENTENCE_CHARS = 20
_MAX_SENTENCE_CHARS = 140
_MIN_WORDS = 3
_SKIP = re.compile(r'copyright|licen[cs]e|author|\$id|-\*-|^test|^tests', re.IGNORECASE)


def module_name(key: str) -> str:
  """'json/decoder.py' -> 'json.decoder'; 'json/__init__.py' -> 'json'."""
  parts = key[:-len('.py')].split('/')
  if parts[-1] == '__init__' and len(parts) > 1:
    parts = parts[:-1]
  return '.'.join(parts)


def purpose(text: str) -> str | None:
  """The first sentence of the module's docstring, on one line and ending in a full stop,
  or None where the file does not parse, has no docstring or it says nothing usable."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # Invalid escapes in old test files.
      tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return None
  doc = ast.get_docstring(tree)
  if not doc:
    return None
  paragraph = ' '.join(doc.strip().split('\n\n')[0].split())
  sentence = re.split(r'(?<=[.!?])\s', paragraph, maxsplit=1)[0].rstrip(':;,')
  if not sentence.endswith(('.', '!', '?')):
    sentence += '.'
  if (not _MIN_SENTENCE_CHARS <= len(sentence) <= _MAX_SENTENCE_CHARS
      or len(sentence.split()) < _MIN_WORDS or not sentence.isprintable()
      or _SKIP.search(sentence) or not sentence[0].isalpha()):
    return None
  return sentence


def sides(docs: Sequence[Doc]) -> dict[str, int]:
  """File key -> 0 (train) or 1 (test): packages' files as the module task splits them,
  every other file by a digest of its path."""
  side = {key: rank('helpdesk-side', key)[0] % 2 for key, _ in docs}
  for train, test in stdlib_maker.split_files(docs).values():
    side.update({key: 0 for key, _ in train})
    side.update({key: 1 for key, _ in test})
  return side


def purpose_questions(docs: Sequence[Doc], side: dict[str, int],
                      which: int) -> list[Example]:
  """A 'What is X for?' example for every file of side `which` with a usable purpose;
  the three wrong answers are purposes of other files of the same side. A sentence that
  two modules share (a copied docstring) is no one's answer."""
  found = [(key, purpose(text)) for key, text in docs if side[key] == which]
  found = [(key, p) for key, p in found if p is not None]
  count: dict[str, int] = {}
  for _, p in found:
    count[p] = count.get(p, 0) + 1
  found = [(key, p) for key, p in found if count[p] == 1]
  examples = []
  for key, p in found:
    others = [(k, q) for k, q in found if k != key]
    if len(others) < NUM_PURPOSES - 1:
      break
    wrong = heapq.nsmallest(NUM_PURPOSES - 1, others,
                            key=lambda kq, key=key: rank('purpose', key, kq[0]))
    label = rank('purpose-label', key)[0] % NUM_PURPOSES
    answers = [q for _, q in wrong]
    answers.insert(label, p)
    examples.append(Example(f'What is the {module_name(key)} module for?',
                            tuple('\n' + a for a in answers), label,
                            files=(key,) + tuple(k for k, _ in wrong)))
  return examples


def package_questions(module_examples: Sequence[Example]) -> list[Example]:
  """The module task's examples asked as a user would: the question, then the code."""
  out = []
  for e in module_examples:
    snippet = e.context[:-len(stdlib_maker.PROMPT)]
    out.append(Example(PACKAGE_QUESTION + snippet + '\n```', PACKAGE_ANSWERS, e.label,
                       files=e.files))
  return out


def helpdesk_tasks(docs: Sequence[Doc], module_train: Sequence[Example],
                   module_test: Sequence[Example]) -> dict[str, list[Example]]:
  """Task name -> examples: both kinds of question on each side, mixed in an order that
  is the same on every machine."""
  side = sides(docs)
  out = {}
  for which, name, module in ((0, HELPDESK_TRAIN, module_train),
                              (1, HELPDESK_TEST, module_test)):
    examples = purpose_questions(docs, side, which) + package_questions(module)
    out[name] = sorted(examples, key=lambda e: rank('helpdesk-order', e.context))
  return out
