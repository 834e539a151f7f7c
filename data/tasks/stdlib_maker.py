"""Offline tasks from the embedded corpus: task files built from held-out stdlib files only.

`heldout_documents` reads the stdlib files a config holds out of training
(data.eval_fraction of them, picked by data/split.py, cleaned as training cleans); from
them come, as the JSON lines that `scripts/eval.py --task` scores ({"context", "choices",
"label"}; data/tasks/make.py writes them):

  stdlib_next_line.jsonl     a few lines of a file, then four candidate next lines: the
                             true one and three lines of other held-out files with the
                             same indentation and about the same length (chance: 25%).
  stdlib_module_train.jsonl  a snippet of a file, then the prompt line '# Package:'; the
  stdlib_module_test.jsonl   choices are the names in PACKAGES, the same list in the same
                             order for every example (a classification task), and the
                             label is the package the file belongs to. A package's tests
                             count as the package (test/test_email/ is email). Half of a
                             package's files, with about half its text, go to test, the
                             rest to train: no file is on both sides.

A choice is scored right after its context with nothing inserted between them (as
lm-evaluation-harness does with target_delimiter ""), so separators live in the choices:
each next-line choice starts with the newline that ends the context's last line, each
package name with a space. Contexts end in a non-space character, so scorers that move a
context's trailing whitespace into the choice (lm-evaluation-harness does) see the same
strings as those that do not.

Every context and choice is a verbatim slice of a held-out file. Nothing is random: each
pick is ranked by a blake2b digest of what is picked, so the same standard library gives
the same bytes on every machine and run.
"""

import bisect
import hashlib
import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from data import mixture, reader
from data.config import DataConfig
from data.tasks.record import Example

NEXT_LINE = 'stdlib_next_line'
MODULE_TRAIN = 'stdlib_module_train'
MODULE_TEST = 'stdlib_module_test'
# The eight packages with the most files (their tests included) among those every
# supported Python (3.11 on) ships. Left out: encodings (generated codec tables, nearly
# identical from file to file, so a split by file would still leak), and distutils and
# lib2to3 (gone in 3.12 and 3.13). Some Linux distributions ship idlelib, tkinter and the
# test suite as separate packages; without them the module task cannot be built.
PACKAGES = ('asyncio', 'ctypes', 'email', 'idlelib', 'importlib', 'json', 'tkinter',
            'unittest')
PROMPT = '\n# Package:'
CHOICES = tuple(' ' + p for p in PACKAGES)
NUM_CHOICES = 4  # Of a next-line example: the true line and three distractors.

# Next-line contexts: up to this many lines and characters, so that context and choice
# fit the tiny config's 128-token window.
_CONTEXT_LINES = 6
_CONTEXT_CHARS = 280
_MIN_LINE_CHARS = 16  # A target or distractor line, without its indentation.
_MAX_LINE_CHARS = 100  # With its indentation.
_MIN_LINE_LETTERS = 8  # Rules out rulers ('# -----') and lone brackets.
_SNIPPET_CHARS = 280  # Module snippets, before the prompt line.
_SNIPPET_LINES = 3  # Non-blank lines a snippet needs to say anything about its package.

Doc = tuple[str, str]  # (key: the file's path relative to the stdlib, text)
_T = TypeVar('_T')


def rank(*parts: object) -> bytes:
  """A sort key that is the same on every machine and run (hash() is salted per process)."""
  return hashlib.blake2b(':'.join(map(str, parts)).encode(), digest_size=8).digest()


def _interleave(groups: Sequence[Sequence[_T]]) -> Iterator[_T]:
  """The first item of each group, then the second of each, ...: every file gives one
  example before any gives two."""
  for i in range(max((len(g) for g in groups), default=0)):
    for g in groups:
      if i < len(g):
        yield g[i]


def heldout_documents(cfg: DataConfig) -> list[Doc]:
  """The stdlib files `cfg` never trains on, cleaned as training cleans them, in order.

  A held-out text that is also a training document (the same file under two names) is
  left out: the model has read it.
  """
  parts = [c for _, c in mixture.components(cfg) if c.source == 'stdlib']
  if not parts:
    where = f'data.mixture={cfg.mixture!r}' if cfg.mixture else f'data.source={cfg.source!r}'
    raise ValueError(f'{where} does not read the stdlib corpus these tasks are built from; '
                     'use a config that trains on it (e.g. configs/tiny.py)')
  seen = {rank(d.text) for d in reader.single_pass(parts[0], heldout=False)}
  return [(d.key, d.text) for d in reader.single_pass(parts[0], heldout=True)
          if rank(d.text) not in seen]


# --- stdlib_next_line ---------------------------------------------------------------


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(' '))


def _telling_line(line: str) -> bool:
  """Worth predicting or offering: long enough to tell apart, words in it, and no tab,
  control character or trailing space (which would blur the boundary)."""
  body = line.lstrip(' ')
  return (len(body) >= _MIN_LINE_CHARS and len(line) <= _MAX_LINE_CHARS
          and line.isprintable() and not line.endswith(' ')
          and sum(map(str.isalpha, body)) >= _MIN_LINE_LETTERS)


def _targets(text: str) -> list[tuple[int, str, str]]:
  """(line number, context, next line) for every telling line that follows a few
  non-blank lines; the context ends where the line before it ends."""
  lines = text.split('\n')
  out = []
  for i in range(2, len(lines)):
    prev = lines[i - 1]
    if not _telling_line(lines[i]) or not prev.strip() or prev != prev.rstrip():
      continue
    context = lines[max(0, i - _CONTEXT_LINES):i]
    while context and (not context[0].strip() or len('\n'.join(context)) > _CONTEXT_CHARS):
      context = context[1:]  # Starts on a non-blank line and fits the window.
    if len(context) >= 2:
      out.append((i, '\n'.join(context), lines[i]))
  return out


class _LinePool:
  """Telling lines of every held-out file, by indentation and length: the distractors."""

  def __init__(self, docs: Sequence[Doc]):
    owner: dict[str, str] = {}
    for key, text in docs:
      for line in text.split('\n'):
        if _telling_line(line):
          owner.setdefault(line, key)
    self.owner = owner  # A line's first file in listed order.
    # One digest per line, mixed with an example's seed to order its candidates: far
    # cheaper than a digest per (example, candidate).
    self.digest = {line: int.from_bytes(rank('line', line), 'big') for line in owner}
    self._lengths: dict[int, list[int]] = {}
    self._lines: dict[int, list[str]] = {}
    for line in sorted(owner, key=lambda s: (len(s), s)):
      self._lengths.setdefault(_indent(line), []).append(len(line))
      self._lines.setdefault(_indent(line), []).append(line)

  def near(self, line: str) -> list[str]:
    """Lines with the same indentation and a length within 10% (at least 2 characters),
    so neither indentation nor length gives the true line away."""
    lengths = self._lengths.get(_indent(line), [])
    slack = max(2, len(line) // 10)
    lo = bisect.bisect_left(lengths, len(line) - slack)
    hi = bisect.bisect_right(lengths, len(line) + slack)
    return self._lines[_indent(line)][lo:hi] if lengths else []


def next_line_task(docs: Sequence[Doc], max_examples: int) -> list[Example]:
  """Up to max_examples next-line examples, spread evenly over the files.

  A target is skipped when fewer than three distractors qualify: lines that occur
  nowhere in the target's own file (so none is the true line, or a line that would be
  right elsewhere in that file), with its indentation and about its length.
  """
  pool = _LinePool(docs)
  groups = []
  for key, text in sorted(docs, key=lambda d: rank('next-line-file', d[0])):
    targets = sorted(_targets(text), key=lambda t: rank('next-line', key, t[0]))
    own_lines = frozenset(text.split('\n'))  # One set per file, shared by its targets.
    groups.append([(key, own_lines, t) for t in targets])
  examples: list[Example] = []
  seen = set()
  for key, own_lines, (i, context, line) in _interleave(groups):
    if len(examples) == max_examples:
      break
    if (context, line) in seen:  # The same lines in two files: one example.
      continue
    others = [s for s in pool.near(line) if s not in own_lines]
    if len(others) < NUM_CHOICES - 1:
      continue
    seen.add((context, line))
    seed = int.from_bytes(rank('distractors', key, i), 'big')
    wrong = heapq.nsmallest(NUM_CHOICES - 1, others, key=lambda s: pool.digest[s] ^ seed)
    label = int.from_bytes(rank('label', key, i), 'big') % NUM_CHOICES
    lines = wrong[:label] + [line] + wrong[label:]
    files = (key,) + tuple(pool.owner[s] for s in wrong)
    examples.append(Example(context, tuple('\n' + s for s in lines), label, files=files))
  return examples


# --- stdlib_module ------------------------------------------------------------------


def package_of(key: str) -> str | None:
  """The package of PACKAGES a stdlib file belongs to, its tests included, or None."""
  parts = key.split('/')
  if len(parts) > 1 and parts[0] in PACKAGES:  # email/parser.py, idlelib/idle_test/x.py
    return parts[0]
  if len(parts) > 2 and parts[0] == 'test' and parts[1].startswith('test_'):
    name = parts[1][len('test_'):]  # test/test_email/test_parser.py
    return name if name in PACKAGES else None
  return None


def split_files(docs: Iterable[Doc]) -> dict[str, tuple[list[Doc], list[Doc]]]:
  """package -> (train files, test files). Raises ValueError if a package has fewer
  than two held-out files."""
  by_package: dict[str, list[Doc]] = {p: [] for p in PACKAGES}
  for key, text in docs:
    if (package := package_of(key)) is not None:
      by_package[package].append((key, text))
  if any(len(files) < 2 for files in by_package.values()):
    counts = ', '.join(f'{p} {len(f)}' for p, f in by_package.items())
    raise ValueError(
        f'{MODULE_TRAIN}/{MODULE_TEST} need at least 2 held-out files per package (one '
        f'for train, one for test); held out: {counts}')
  return {p: _split_package(files) for p, files in by_package.items()}


def _split_package(files: list[Doc]) -> tuple[list[Doc], list[Doc]]:
  """(train, test): the files ranked by length, and of each pair the one with the smaller
  digest of its path goes to test (an odd last file to train). Both sides get half the
  files and about half the text: a pick by digest alone can leave one side of a package
  a few short files, and a package that is mostly two long files needs one on each side.
  """
  by_length = sorted(files, key=lambda d: (-len(d[1]), d[0]))
  runs = [by_length[i:i + 2] for i in range(0, len(by_length) - 1, 2)]
  test = [min(run, key=lambda d: rank('module-split', d[0])) for run in runs]
  return [d for d in files if d not in test], test


def snippets(text: str) -> list[str]:
  """The file cut into consecutive runs of whole lines of at most _SNIPPET_CHARS, blank
  lines trimmed from both ends; runs with under _SNIPPET_LINES non-blank lines are dropped."""
  out: list[str] = []

  def close(run: list[str]) -> None:
    while run and not run[-1].strip():
      run.pop()
    while run and not run[0].strip():
      run.pop(0)
    if sum(1 for s in run if s.strip()) >= _SNIPPET_LINES:
      out.append('\n'.join(run))

  run: list[str] = []
  size = -1  # Characters of '\n'.join(run).
  for line in text.split('\n'):
    if size + 1 + len(line) > _SNIPPET_CHARS:
      close(run)
      run, size = [], -1
      if len(line) > _SNIPPET_CHARS:  # In no snippet: the next one starts after it.
        continue
    run.append(line)
    size += 1 + len(line)
  close(run)
  return out


def module_tasks(docs: Sequence[Doc], per_package: int) -> tuple[list[Example], list[Example]]:
  """(train, test) examples: up to per_package of each package on each side, spread
  evenly over its files, in an order that mixes the packages.

  A snippet whose text also occurs in another package's files, or on the other side of
  the split (licence headers, shared boilerplate), is dropped: it would have two right
  answers, or be a test example seen in training.
  """
  splits = split_files(docs)
  cut = {key: snippets(text) for key, text in docs}
  owners: dict[str, set[tuple[str, int]]] = {}
  for package, sides in splits.items():
    for side, files in enumerate(sides):
      for key, _ in files:
        for s in cut[key]:
          owners.setdefault(s, set()).add((package, side))
  out: tuple[list[Example], list[Example]] = ([], [])
  for package, sides in splits.items():
    for side, files in enumerate(sides):
      files = sorted(files, key=lambda d: rank('module-file', d[0]))
      groups = [sorted(((key, s) for s in set(cut[key]) if len(owners[s]) == 1),
                       key=lambda ks: rank('snippet', *ks)) for key, _ in files]
      picked: dict[str, str] = {}  # snippet -> file, first come.
      for key, s in _interleave(groups):
        if len(picked) == per_package:
          break
        picked.setdefault(s, key)
      label = PACKAGES.index(package)
      out[side].extend(Example(s + PROMPT, CHOICES, label, files=(key,))
                       for s, key in picked.items())
  for examples in out:
    examples.sort(key=lambda e: rank('order', e.context))
  return out
