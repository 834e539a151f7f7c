"""Dealing: which packing stream gets each training document, and the streams themselves.

The training documents form one sequence, numbered n = 0, 1, 2, ... across epochs (in a
mixture, n alone picks the source: data/mixture.py). They are dealt to K packing
streams, K = data.streams or, by default, the global row count G = batch_size *
process_count: document n goes to the stream with the fewest characters (len of the
cleaned text) dealt so far, the lowest-numbered one on a tie. A stream is its documents
([BOS] ids EOS) end to end, cut into windows of seq_len + 1 tokens that share their edge
token (data/packing.py). Global row r of batch b is the next window of stream
(b * G + r) % K, and process p hands out the global rows [p * batch_size,
(p + 1) * batch_size). So the rows of a batch come from different streams, not
consecutive windows of one document, and the global batch (every process's rows in
process order) is the same for every process count that divides G. Each process reads
and cleans the whole sequence, so every process deals alike, but tokenises only the
documents of its own streams, a chunk at a time on several threads; a document for a
stream still busy with a long one waits, as text, in that stream's queue.

Why by characters: every stream hands out tokens at the same rate. Dealt in turn
(n % K), a stream that drew long documents falls behind and the documents read for the
others meanwhile pile up, a pile that grows with the run. Dealt to the stream with the
fewest characters, no stream gets more than the longest document ahead of another, and
the text is known to every process before tokenising (token counts would make every
process tokenise everything).

Layout maps rows to streams and streams to processes, Dealer reads and deals the
sequence and encodes this process's documents, Stream windows one stream. What they
save and restore is in data/state.py.
"""

import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from data import formats, packing, sources
from data import reader as reader_lib
from data.config import DataConfig

# How documents are numbered, as data states record it: one sequence read by every process.
GLOBAL = 'global'


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which packing stream feeds each row, and which streams this process owns."""

  num_streams: int  # K packing streams, the documents dealt among them.
  rows: int  # G: the rows of a batch, all processes'.
  first_row: int  # This process's first row among them.
  batch_size: int  # This process's rows.

  @classmethod
  def make(cls, cfg: DataConfig, batch_size: int, process_index: int,
           process_count: int) -> 'Layout':
    rows = batch_size * process_count
    k = cfg.streams or rows
    # A stream must feed the rows of one process only: K a multiple of G puts stream j
    # on global row j % G in every batch.
    if process_count > 1 and k % rows:
      raise ValueError(
          f'data.streams={cfg.streams} must be 0 or a multiple of the global batch rows '
          f'({batch_size} per process x {process_count} processes = {rows}) so that each '
          'packing stream feeds one process')
    return cls(k, rows, process_index * batch_size, batch_size)

  def owned(self) -> list[int]:
    """This process's streams, in order."""
    if self.rows == self.batch_size:
      return list(range(self.num_streams))
    return [j for j in range(self.num_streams)
            if self.first_row <= j % self.rows < self.first_row + self.batch_size]

  def stream(self, batch: int, row: int) -> int:
    """The stream of this process's row `row` in batch number `batch`."""
    return (batch * self.rows + self.first_row + row) % self.num_streams


@dataclasses.dataclass(eq=False)
class Doc:
  """A document of this process's streams, from when it is read until it is packed."""

  n: int  # Its number in the document sequence.
  stream: int  # The stream it was dealt to.
  key: str
  text: str | None  # Dropped once encoded.
  before: dict[str, Any]  # The reader's state just before it: restoring there reads it.
  # int32 [BOS] ids EOS (data.format='sft': [N, 2], data/sft.py); None until encoded.
  tokens: np.ndarray | None = None


class Dealer:
  """Reads the document sequence, deals it to the streams, queues this process's part.

  Each document goes to the stream with the fewest characters dealt so far (ties: the
  lowest index). Documents of other processes' streams are read (the dealing, the
  reader's positions, counters and dedup set must see them) and dropped without
  tokenising. Encoding waits until a stream needs a document, then covers a chunk of
  queued ones in one threaded call.
  """

  def __init__(self, reader: reader_lib.MixtureReader, num_streams: int,
               encode: Callable[[list[str]], list[np.ndarray]], chunk: int):
    self._reader = reader
    self._k = num_streams
    self._encode = encode
    self._chunk = max(chunk, 1)
    self._queues: dict[int, collections.deque[Doc]] = {}
    self._first: dict[int, int] = {}
    self._unencoded = 0  # Queued documents not encoded yet.
    self._dealt = np.zeros(num_streams, np.int64)  # Characters dealt to each stream.
    # The dealt characters before document number self._since, and (stream, characters)
    # of each document read from there on: checkpoint() rewinds the dealing with them.
    self._since = 0
    self._dealt_since = self._dealt.copy()
    self._deals: collections.deque[tuple[int, int]] = collections.deque()

  def restart(self, reader_state: dict[str, Any], dealt: Sequence[int],
              first: dict[int, int]) -> None:
    """Reads on from `reader_state`, `dealt` the characters dealt before it; stream j
    takes the documents dealt to it from number first[j] on."""
    self._reader.load_state_dict(reader_state)
    self._dealt = np.array(dealt, np.int64)
    if self._dealt.shape != (self._k,):
      raise ValueError(f'data state deals to {len(dealt)} streams, not {self._k}')
    self._since = self._reader.counter
    self._dealt_since = self._dealt.copy()
    self._deals.clear()
    self._first = dict(first)
    self._queues = {j: collections.deque() for j in first}
    self._unencoded = 0

  def take(self, stream: int) -> Doc:
    """The stream's next document, encoded."""
    waiting = self._queues[stream]
    while not waiting:
      self._read()
    doc = waiting.popleft()
    if doc.tokens is None:
      self._encode_chunk(doc)
    return doc

  def checkpoint(self, held: Iterable[Doc]) -> tuple[dict[str, Any], list[int]]:
    """A reader state no later than any document in `held` or in the queues, and the
    characters dealt to each stream before it (less their minimum: only the differences
    steer the dealing).

    The streams pass their first documents; a stream that holds none needs either its
    queue's first or one not read yet. Never earlier than the last checkpoint.
    """
    docs = list(held) + [q[0] for q in self._queues.values() if q]
    if docs:
      first = min(docs, key=lambda d: d.n)
      reader_state, n = first.before, first.n
    else:
      reader_state, n = self._reader.state_dict(), self._reader.counter
    if n < self._since:
      raise AssertionError(f'checkpoint at document {n}, before the last one ({self._since})')
    while self._since < n:
      j, chars = self._deals.popleft()
      self._dealt_since[j] += chars
      self._since += 1
    return reader_state, (self._dealt_since - self._dealt_since.min()).tolist()

  def _read(self) -> None:
    n = self._reader.counter
    j = int(np.argmin(self._dealt))  # The first of the streams dealt the fewest.
    mine = j in self._queues and n >= self._first[j]
    before = self._reader.state_dict() if mine else None
    _, read = self._reader.next()
    self._dealt[j] += len(read.text)
    self._deals.append((j, len(read.text)))
    if mine:
      self._queues[j].append(Doc(n, j, read.key, read.text, before))
      self._unencoded += 1
    # Else another process's, or one its stream took before the state was saved.

  def _encode_chunk(self, doc: Doc) -> None:
    while self._unencoded < self._chunk:  # Read ahead: one call encodes a chunk.
      self._read()
    # With it go the streams' next documents; those queued far behind a long document
    # wait as text until their stream nears them.
    depth = max(2, -(-self._chunk // len(self._queues)))
    soon = [(level, d.n, d) for q in self._queues.values()
            for level, d in zip(range(depth), q) if d.tokens is None]
    soon.sort(key=lambda item: item[:2])
    chunk = [doc] + [d for _, _, d in soon[:self._chunk - 1]]
    for d, tokens in zip(chunk, self._encode([d.text for d in chunk])):
      d.tokens, d.text = tokens, None
    self._unencoded -= len(chunk)


class Stream:
  """One packing stream: the documents dealt to it, end to end, cut into windows.

  With fine-tuning examples (data/formats.py) they are packed whole into padded rows
  instead; a row then always starts at an example, so the offset stays 0.
  """

  def __init__(self, index: int, seq_len: int, fmt: formats.Text):
    self.index = index
    self._seq_len = seq_len
    self._format = fmt
    # The document the next window starts in (before the stream's first window: the
    # number from which on the documents dealt to it are its own); its offset is
    # self._windows.offset, the token of it (counting BOS) that the window starts at.
    self.next = 0
    self._key: str | None = None  # That document's key, while resuming inside it.
    self._docs: collections.deque[Doc] = collections.deque()  # Taken, from `next` on.
    self._windows = self._packer(0)  # Their tokens.

  @property
  def offset(self) -> int:
    return self._windows.offset

  @property
  def first(self) -> Doc | None:
    return self._docs[0] if self._docs else None

  def state_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {'next': self.next, 'offset': self.offset}
    if self.offset:  # Names the document, so a resume onto changed data fails.
      out['key'] = self._docs[0].key if self._docs else self._key
    return out

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.next, offset = int(state['next']), int(state['offset'])
    if self.next < 0 or offset < 0:
      raise ValueError(f'data state: stream {self.index} cannot start at '
                       f'document {self.next}, token {offset}')
    self._key = state.get('key')
    self._docs.clear()
    self._windows = self._packer(offset)

  def _packer(self, offset: int) -> 'packing.Windower | packing.RowPacker':
    try:
      return self._format.packer(self._seq_len, offset)
    except ValueError as e:
      raise ValueError(f'data state: stream {self.index} {e}') from None

  def fill(self, take: Callable[[int], Doc], size: int) -> None:
    """Takes documents until `size` tokens are held from the next window's start on."""
    while self._windows.buffered < size:
      doc = take(self.index)
      # The next document dealt to this stream: after the last one it took, or from
      # number `next` on (resuming inside a document: that one, checked below).
      after = self._docs[-1].n + 1 if self._docs else self.next
      if doc.stream != self.index or doc.n < after:
        raise AssertionError(f'stream {self.index} expected a document dealt to it from '
                             f'number {after} on, got {doc.n} dealt to {doc.stream}')
      if not self._docs and self.offset:
        self._check_resumed(doc)
      self._docs.append(doc)
      self._windows.add(doc.tokens)

  def window(self, take: Callable[[int], Doc]) -> np.ndarray:
    """The next int32 [seq_len + 1] window; the next one starts at its last token."""
    self.fill(take, self._seq_len + 1)
    last = self._docs[-1].n
    out = self._windows.pop()
    while len(self._docs) > self._windows.pieces:  # Those it has passed.
      self._docs.popleft()
    # A row of whole examples may use up every document held.
    self.next = self._docs[0].n if self._docs else last + 1
    self._key = None
    return out

  def _check_resumed(self, doc: Doc) -> None:
    if doc.n != self.next:  # The dealing differs: the documents' lengths do.
      raise sources.DataError(
          f'data state does not match the data: stream {self.index} resumes inside '
          f'document {self.next} ({self._key!r}), but the data deals it document {doc.n} '
          f'({doc.key!r}) first (did the data change?)')
    if (self._key is not None and doc.key != self._key) or self.offset >= len(doc.tokens):
      raise sources.DataError(
          f'data state does not match the data: document {doc.n} is {doc.key!r} '
          f'({len(doc.tokens)} tokens), the state has {self.offset} tokens of '
          f'{self._key!r} packed (did the data change?)')
