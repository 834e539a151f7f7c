"""Document cleaning: blank, binary, short and exactly duplicated documents are dropped.

Every reader (training, held-out, tokenizer training) applies the same rules, in stream
order, to every document of a source, whichever process or split it belongs to, so all
hosts agree on each verdict and a text kept in one split is dropped from the other
(exact-duplicate decontamination).

Deduplication remembers an 8-byte hash of each kept text within one epoch of one source
(about 100 bytes of memory per distinct document; the set is emptied at each epoch).
Resuming does not store that set: it re-reads the epoch's documents up to the resume
point, without tokenising them, to rebuild it. That suits corpora that can be re-read
in minutes; for web-scale data deduplicate offline.

Binary or non-UTF-8 documents (files are decoded with errors='replace', so such bytes
arrive as U+FFFD) are dropped by a rule on their first BINARY_HEAD characters, as
git and grep look at a file's head: a NUL, or more than half of them U+FFFD or C0
control characters other than tab, newline, vertical tab, form feed and carriage
return. Random bytes come out about 55% such characters and nearly always hold a NUL;
UTF-16 text is full of NULs; accented Latin-1 prose stays well under half (10-15%). The
half is set above the standard library's worst file (a KOI8-R test module, 42%) so that the
default corpus loses none. A source whose documents are mostly binary is refused
(`mostly_binary`).
"""

import hashlib
import re
from typing import Any

REASONS = ('empty', 'short', 'duplicate', 'binary')
_SURROGATE = re.compile('[\ud800-\udfff]')
BINARY_HEAD = 8192  # Characters of a document the binary rule looks at.
# What undecodable bytes and binary data become; tab, newline, \v, \f and \r are text.
_NOT_TEXT = re.compile('[\x00-\x08\x0e-\x1f\x7f\ufffd]')
# A source is refused once more than half the documents examined are binary, after this
# many (or at the end of a pass or epoch, however few): one stray file is only dropped.
BINARY_REFUSE_AFTER = 64


def fix_text(text: str) -> str:
  """Replaces lone surrogates (e.g. from JSON '\\ud800' escapes) with U+FFFD.

  They are not valid Unicode scalar values: UTF-8 encoding, and so the tokenizer,
  would fail on them. Files themselves are decoded with errors='replace'.
  """
  if _SURROGATE.search(text) is None:
    return text
  return _SURROGATE.sub('\ufffd', text)


class Cleaner:
  """Decides, document by document in stream order, whether to keep it."""

  def __init__(self, min_chars: int = 0, dedup: bool = False):
    self._min_chars = min_chars
    self._dedup = dedup
    self._epoch: int | None = None
    self._seen: set[int] = set()

  @property
  def dedup(self) -> bool:
    return self._dedup

  def verdict(self, text: str, epoch: int = 0) -> str | None:
    """None to keep the text, else why it is dropped (one of REASONS)."""
    if not text or text.isspace():
      return 'empty'
    if is_binary(text):
      return 'binary'
    if len(text) < self._min_chars:
      return 'short'
    if self._dedup:
      if epoch != self._epoch:
        self._epoch, self._seen = epoch, set()
      digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()
      h = int.from_bytes(digest, 'big')
      if h in self._seen:
        return 'duplicate'
      self._seen.add(h)
    return None


def is_binary(text: str) -> bool:
  """True for binary data or non-UTF-8 text, by the rule in the module docstring."""
  head = text[:BINARY_HEAD]
  if '\x00' in head:
    return True
  return 2 * len(_NOT_TEXT.findall(head)) > len(head)


def mostly_binary(counts: dict[str, int], *, done: bool = False) -> bool:
  """Whether counts (kept, heldout and each reason) say the source is not text.

  `done`: the pass or epoch is over, so a small source is judged on what it has.
  """
  binary = counts.get('binary', 0)
  examined = sum(counts.values())
  return 2 * binary > examined and (done or examined >= BINARY_REFUSE_AFTER)


def zero_counts() -> dict[str, int]:
  """Per-reason counters: kept and held-out documents, then each reason for a drop."""
  return dict.fromkeys(('kept', 'heldout') + REASONS, 0)


def describe(counts: dict[str, Any]) -> str:
  return ', '.join(f'{counts.get(k, 0)} {k}' for k in ('kept', 'heldout') + REASONS)
