"""Training and held-out batches: read, clean, tokenise, pack; resumable exactly.

The rows of a training batch come from K packing streams (K = data.streams, by default
the batch's row count): row r of a batch is the next window of stream (r + offset) % K,
so one batch holds windows of K different documents rather than K consecutive windows
of one. A stream that runs out of tokens takes the next document from the one shared
reader (data/reader.py), which documents are read ahead from and encoded in batches.

The state is small and JSON-able: the reader's state at the first document no stream
has taken yet (per source a position and counters, plus the mixture's counter), and per
stream the position of the document it is packing, how many of that document's tokens
are already packed, and the packer's leftover (fewer than one window). Restoring re-reads
each stream's document and skips the packed part, so batches continue bit for bit.
"""

import collections
import copy
import logging
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from data import cleaning
from data import packing
from data import reader as reader_lib
from data import sources
from data.config import DataConfig
from data.packing import Packer
from data.tokenizer import Tokenizer

_STATE_VERSION = 2
_T = TypeVar('_T')
Batch = np.ndarray | dict[str, np.ndarray]
log = logging.getLogger(__name__)


class _Feed:
  """The shared reader, read ahead a chunk at a time and encoded as one batch."""

  def __init__(self, reader: reader_lib.MixtureReader,
               encode: Callable[[list[str]], list[list[int]]], chunk: int):
    self.reader = reader
    self.encode = encode
    self._chunk = max(chunk, 1)
    # (reader state before the document, source index, document, token ids).
    self._pending: collections.deque[tuple[dict[str, Any], int, sources.Document, list[int]]]
    self._pending = collections.deque()

  def take(self) -> tuple[int, sources.Document, list[int]]:
    if not self._pending:
      items = []
      for _ in range(self._chunk):
        before = self.reader.state_dict()
        items.append((before, *self.reader.next()))
      ids = self.encode([doc.text for _, _, doc in items])
      self._pending.extend((*item, i) for item, i in zip(items, ids))
    _, source, doc, ids = self._pending.popleft()
    return source, doc, ids

  def state_dict(self) -> dict[str, Any]:
    """The reader's state as if no document had been read ahead."""
    return self._pending[0][0] if self._pending else self.reader.state_dict()

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self._pending.clear()
    self.reader.load_state_dict(state)


class _Stream:
  """One packing stream: a packer and the document it is cutting into windows."""

  def __init__(self, packer: Packer):
    self.packer = packer
    self.source = 0
    self.doc: sources.Document | None = None
    self.tokens: list[int] = []  # The document as it enters the stream ([BOS] ids EOS).
    self.offset = 0  # Tokens of it already in the packer.

  def start(self, source: int, doc: sources.Document, ids: list[int], offset: int = 0) -> None:
    self.source, self.doc, self.tokens, self.offset = source, doc, self.packer.wrap(ids), offset

  def window(self, feed: _Feed) -> np.ndarray:
    while (window := self.packer.pop()) is None:
      if self.doc is None:
        self.start(*feed.take())
      # Feed at most one window's worth, so the leftover (and the state) stays small.
      end = min(self.offset + self.packer.window - self.packer.buffered, len(self.tokens))
      self.packer.add(self.tokens[self.offset:end])
      self.offset = end
      if end == len(self.tokens):
        self.doc, self.tokens, self.offset = None, [], 0
    return window

  def state_dict(self) -> dict[str, Any]:
    return {
        'source': self.source if self.doc else 0,
        'position': self.doc.position.to_dict() if self.doc else None,
        'offset': self.offset,
        'buffer': self.packer.state_dict()['buffer'],
    }


class TrainBatches:
  """Endless int32 batches [batch_size, seq_len + 1] of this process's training documents.

  With data.segment_ids each batch is a dict {'tokens', 'segment_ids'} of that shape
  instead (see packing.segment_ids). Hosts read disjoint documents (data/reader.py);
  held-out and cleaned-out documents are skipped. `state_dict()` describes the batches
  handed out so far, never prefetched ones. With prefetch > 0 a background thread
  reads, encodes and packs that many batches ahead; call `close()` (or use `with`) to
  stop it early.
  """

  def __init__(
      self,
      cfg: DataConfig,
      tokenizer: Tokenizer,
      batch_size: int,
      seq_len: int,
      *,
      process_index: int = 0,
      process_count: int = 1,
      seed: int = 0,
      add_bos: bool = True,
      prefetch: int = 2,
      encode_docs: int = 64,
  ):
    _check_sizes(batch_size, seq_len, process_index, process_count)
    self._cfg = cfg
    self._reader = reader_lib.MixtureReader(
        cfg, seed=seed, process_index=process_index, process_count=process_count)
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._num_streams = cfg.streams or batch_size
    self._seq_len = seq_len
    self._process_index = process_index
    self._process_count = process_count
    self._seed = seed
    self._bos_id = tokenizer.bos_id if add_bos else None
    self._prefetch = prefetch
    threads = cfg.encode_threads or os.cpu_count() or 1
    self._feed = _Feed(self._reader, lambda t: tokenizer.encode_batch(t, num_threads=threads),
                       encode_docs)
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._reset({
        'version': _STATE_VERSION,
        'reader': self._reader.state_dict(),
        'streams': [_Stream(self._packer()).state_dict() for _ in range(self._num_streams)],
        'next_stream': 0,
        'batches': 0,
    })

  # Iteration.

  def __iter__(self) -> 'TrainBatches':
    return self

  def __next__(self) -> Batch:
    if self._prefetch <= 0:
      batch, self._state = self._produce()
      return batch
    if self._error is not None:
      raise self._error
    if self._thread is None:
      self._start_thread()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._error = item
      raise item
    batch, self._state = item
    return batch

  def close(self) -> None:
    """Stops the prefetch thread; the next batch starts it again, exactly in order."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      self._reset(self._state)  # Drop what was prefetched but not handed out.

  def __enter__(self) -> 'TrainBatches':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # State.

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state after the last batch handed out."""
    state = copy.deepcopy(self._state)
    for s in state['streams']:
      if s['position'] is not None:
        pos = sources.Position.from_dict(s['position'])
        s['shard_name'] = self._reader.readers[s['source']].shard_name(pos)
    readers = zip(self._reader.readers, state['reader']['sources'])
    state.update(
        shard_names=[r.shard_name(sources.Position.from_dict(s['position']))
                     for r, s in readers],
        seed=self._seed,
        process_index=self._process_index,
        process_count=self._process_count,
    )
    return state

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Continues from `state`: the next batch is the one after it was taken."""
    state = self._upgrade(state)
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'data state has version {state.get("version")!r}, '
                       f'expected {_STATE_VERSION}')
    if len(state['reader']['sources']) != len(self._reader.readers):
      raise ValueError(
          f'data state has {len(state["reader"]["sources"])} sources but the config names '
          f'{len(self._reader.readers)}; did data.mixture change?')
    for s in state['streams']:
      if s['position'] is not None:
        self._check_shard(s['source'], s['position'], s.get('shard_name'))
    reader_states = state['reader']['sources']
    names = state.get('shard_names') or [None] * len(reader_states)
    for i, (s, name) in enumerate(zip(reader_states, names)):
      self._check_shard(i, s['position'], name)
    self.close()
    self._reset(state)
    self._build()  # Now, so that a state that does not match the data fails here.

  def stats(self) -> dict[str, Any]:
    """Document counts of the batches handed out: per source and summed over sources.

    Each count is of this process's documents read so far (every epoch): 'kept',
    'heldout', and the cleaning drops 'empty', 'short', 'duplicate'.
    """
    per_source = [dict(s['counts']) for s in self._state['reader']['sources']]
    total = {k: sum(c.get(k, 0) for c in per_source) for k in cleaning.zero_counts()}
    return {'total': total,
            'sources': [dict(c, source=r.label) for c, r in zip(per_source, self._reader.readers)]}

  def _check_shard(self, source: int, pos: dict[str, int], name: str | None) -> None:
    expected = self._reader.readers[source].shard_name(sources.Position.from_dict(pos))
    if name is not None and name != expected:
      raise ValueError(
          f'data state points into {name!r} but the data now has {expected!r} there; '
          'did data.files or the data change?')

  def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
    """Reads a version-1 state (one packing stream) as a version-2 one."""
    if state.get('version') != 1:
      return state
    pos = sources.Position.from_dict(state['position'])
    self._check_shard(0, state['position'], state.get('shard_name'))
    offset = int(state['offset'])
    streams = [_Stream(self._packer()).state_dict() for _ in range(self._num_streams)]
    streams[0] = {'source': 0, 'position': pos.to_dict() if offset else None,
                  'offset': offset, 'buffer': state['packer']['buffer']}
    reader_pos = pos.next() if offset else pos
    return {
        'version': _STATE_VERSION,
        'reader': {'counter': 0, 'sources': [{'position': reader_pos.to_dict(), 'counts': {}}]},
        'streams': streams,
        'next_stream': 0,
        'batches': int(state['batches']),
    }

  # Producing batches.

  def _packer(self) -> Packer:
    return Packer(self._seq_len, self._tokenizer.eos_id, self._bos_id)

  def _reset(self, state: dict[str, Any]) -> None:
    """Sets what is handed out next; the streams are rebuilt from it on the next batch."""
    self._state = state
    self._built = False
    self._error = None
    self._queue = queue.Queue(maxsize=max(self._prefetch, 1))

  def _build(self) -> None:
    state = self._state
    self._feed.load_state_dict(state['reader'])
    saved = list(state['streams'])
    if len(saved) != self._num_streams:
      # A new batch size or process count: streams past the new count give up the rest
      # of their documents rather than failing the resume.
      log.warning('data state has %d packing streams, resuming with %d', len(saved),
                  self._num_streams)
      saved = (saved + [_Stream(self._packer()).state_dict()] * self._num_streams)
      saved = saved[:self._num_streams]
    self._streams = [_Stream(self._packer()) for _ in saved]
    reopen: list[tuple[_Stream, int, sources.Position, int]] = []
    for stream, s in zip(self._streams, saved):
      stream.packer.load_state_dict({'buffer': s['buffer']})
      if s['position'] is not None:
        reopen.append((stream, int(s['source']), sources.Position.from_dict(s['position']),
                       int(s['offset'])))
    for source, reader in enumerate(self._reader.readers):
      mine = [r for r in reopen if r[1] == source]
      if not mine:
        continue
      docs = reader.fetch([pos for _, _, pos, _ in mine])
      for (stream, _, _, offset), doc, ids in zip(
          mine, docs, self._feed.encode([d.text for d in docs])):
        stream.start(source, doc, ids, offset)
        if not 0 <= offset < len(stream.tokens):
          raise sources.DataError(
              f'data state does not match the data: the document at {doc.position} has '
              f'{len(stream.tokens)} tokens, the state has {offset} of them packed')
    self._next_stream = int(state['next_stream']) % self._num_streams
    self._batches = int(state['batches'])
    self._built = True

  def _snapshot(self) -> dict[str, Any]:
    return {
        'version': _STATE_VERSION,
        'reader': self._feed.state_dict(),
        'streams': [s.state_dict() for s in self._streams],
        'next_stream': self._next_stream,
        'batches': self._batches,
    }

  def _produce(self) -> tuple[Batch, dict[str, Any]]:
    if not self._built:
      self._build()
    rows = []
    for _ in range(self._batch_size):
      rows.append(self._streams[self._next_stream].window(self._feed))
      self._next_stream = (self._next_stream + 1) % self._num_streams
    self._batches += 1
    return self._batch(np.stack(rows)), self._snapshot()

  def _batch(self, tokens: np.ndarray) -> Batch:
    if not self._cfg.segment_ids:
      return tokens
    return {'tokens': tokens, 'segment_ids': packing.segment_ids(tokens, self._tokenizer.eos_id)}

  def _start_thread(self) -> None:
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._work, args=(self._stop, self._queue), daemon=True,
        name='TrainBatches')
    self._thread.start()

  def _work(self, stop: threading.Event, out: queue.Queue) -> None:
    try:
      while not stop.is_set():
        item = self._produce()
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as e:  # Handed to the consumer, which raises it.
      while not stop.is_set():
        try:
          out.put(e, timeout=0.1)
          return
        except queue.Full:
          pass


def eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    add_bos: bool = True,
) -> list[Batch]:
  """Up to num_batches batches [batch_size, seq_len + 1] of held-out documents.

  Every process packs the same held-out stream into global batches of
  batch_size * process_count rows and keeps its own rows, so all processes get the
  same number of batches and the set does not depend on the process count. One pass
  in listed order: every call returns the same batches. With data.segment_ids the
  batches are dicts, as TrainBatches hands out.
  """
  _check_sizes(batch_size, seq_len, process_index, process_count)
  if num_batches <= 0:
    return []
  packer = Packer(seq_len, tokenizer.eos_id, tokenizer.bos_id if add_bos else None)
  global_rows = batch_size * process_count
  wanted = num_batches * global_rows
  windows: list[np.ndarray] = []
  threads = cfg.encode_threads or os.cpu_count() or 1
  any_docs = False
  for docs in _chunks(reader_lib.single_pass(cfg, heldout=True), 16):
    any_docs = True
    for ids in tokenizer.encode_batch([d.text for d in docs], num_threads=threads):
      packer.add_document(ids)
      while len(windows) < wanted and (window := packer.pop()) is not None:
        windows.append(window)
    if len(windows) >= wanted:
      break
  if not any_docs:
    raise ValueError(
        f'no held-out documents: data.eval_fraction={cfg.eval_fraction} holds out none '
        'of this source; raise it')
  full = len(windows) // global_rows
  if not full:
    raise ValueError(
        f'the held-out documents fill {len(windows)} windows, fewer than one eval batch '
        f'of {global_rows}; raise data.eval_fraction or lower the batch size')
  first = [b * global_rows + process_index * batch_size for b in range(full)]
  out: list[Batch] = []
  for i in first:
    tokens = np.stack(windows[i:i + batch_size])
    out.append({'tokens': tokens, 'segment_ids': packing.segment_ids(tokens, tokenizer.eos_id)}
               if cfg.segment_ids else tokens)
  return out


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
  it = iter(items)
  while chunk := [x for _, x in zip(range(size), it)]:
    yield chunk


def _check_sizes(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
