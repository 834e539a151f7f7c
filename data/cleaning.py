"""Document cleaning: blank, short and exactly duplicated documents are dropped.

Every reader (training, held-out, tokenizer training) applies the same rules, in stream
order, to every document of a source, whichever process or split it belongs to, so all
hosts agree on each verdict and a text kept in one split is dropped from the other
(exact-duplicate decontamination).

Deduplication remembers an 8-byte hash of each kept text within one epoch of one source
(about 100 bytes of memory per distinct document; the set is emptied at each epoch).
Resuming does not store that set: it re-reads the epoch's documents up to the resume
point, without tokenising them, to rebuild it. That suits corpora that can be re-read
in minutes; for web-scale data deduplicate offline. A hub source split across hosts
(data/sources.py) is deduplicated per host.
"""

import hashlib
import re
from typing import Any

REASONS = ('empty', 'short', 'duplicate')
_SURROGATE = re.compile('[\ud800-\udfff]')


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


def zero_counts() -> dict[str, int]:
  """Per-reason counters: kept and held-out documents, then each reason for a drop."""
  return dict.fromkeys(('kept', 'heldout') + REASONS, 0)


def describe(counts: dict[str, Any]) -> str:
  return ', '.join(f'{counts.get(k, 0)} {k}' for k in ('kept', 'heldout') + REASONS)
