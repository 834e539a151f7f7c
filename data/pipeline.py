"""Training and held-out batches: read, filter, tokenise, pack; resumable exactly.

Training state is where the next unconsumed token comes from: the position of the
document being packed, how many of its tokens are already in windows, and the packer's
leftover tokens. Restoring it re-reads that one document and skips the consumed part,
so a restored iterator continues bit for bit.
"""

import collections
import copy
import queue
import threading
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np

from data import sources
from data import split
from data.config import DataConfig
from data.packing import Packer
from data.tokenizer import Tokenizer

_STATE_VERSION = 1
_T = TypeVar('_T')


class TrainBatches:
  """Endless int32 batches [batch_size, seq_len + 1] of this process's training documents.

  Documents whose epoch index is process_index modulo process_count belong to this
  process, so hosts read disjoint documents. Held-out documents are skipped.
  `state_dict()` describes the batches handed out so far, never prefetched ones.
  With prefetch > 0 a background thread prepares that many batches ahead; call
  `close()` (or use `with`) to stop it early.
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
      encode_docs: int = 16,
  ):
    _check_sizes(batch_size, seq_len, process_index, process_count)
    self._cfg = cfg
    self._source = sources.open_source(cfg)
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._process_index = process_index
    self._process_count = process_count
    self._seed = seed  # Shuffles the shard (file) order of each epoch.
    self._bos_id = tokenizer.bos_id if add_bos else None
    self._prefetch = prefetch
    self._encode_docs = encode_docs
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._reset(sources.Position(), 0, [], 0)

  # Iteration.

  def __iter__(self) -> 'TrainBatches':
    return self

  def __next__(self) -> np.ndarray:
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
      # Drop what was prefetched but not handed out.
      self._restore(self.state_dict())

  def __enter__(self) -> 'TrainBatches':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # State.

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state after the last batch handed out."""
    pos = sources.Position.from_dict(self._state['position'])
    return dict(
        copy.deepcopy(self._state),
        shard_name=sources.shard_name(self._source, pos, self._seed),
        seed=self._seed,
        process_index=self._process_index,
        process_count=self._process_count,
    )

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Continues from `state`: the next batch is the one after it was taken."""
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'data state has version {state.get("version")!r}, '
                       f'expected {_STATE_VERSION}')
    pos = sources.Position.from_dict(state['position'])
    expected = sources.shard_name(self._source, pos, self._seed)
    if state.get('shard_name', expected) != expected:
      raise ValueError(
          f'data state points into {state["shard_name"]!r} but the data now has '
          f'{expected!r} there; did data.files or the data change?')
    self.close()
    self._restore(state)

  def _restore(self, state: dict[str, Any]) -> None:
    pos = sources.Position.from_dict(state['position'])
    self._reset(pos, int(state['offset']), state['packer']['buffer'], int(state['batches']))

  # Producing batches.

  def _reset(self, pos: sources.Position, offset: int, buffer: list[int], batches: int) -> None:
    self._packer = Packer(self._seq_len, self._tokenizer.eos_id, self._bos_id)
    self._packer.load_state_dict({'buffer': buffer})
    self._start_pos = pos
    # The first document not yet wholly packed is _pending[0] if any, else the one at
    # _after; _offset of its tokens are already in the packer.
    self._after = pos
    self._offset = offset
    self._pending: collections.deque[tuple[sources.Document, list[int]]] = (
        collections.deque())
    self._docs: Iterator[sources.Document] | None = None
    self._batches = batches
    self._error = None
    self._queue = queue.Queue(maxsize=max(self._prefetch, 1))
    self._state = self._snapshot()

  def _snapshot(self) -> dict[str, Any]:
    pos = self._pending[0][0].position if self._pending else self._after
    return {
        'version': _STATE_VERSION,
        'position': pos.to_dict(),
        'offset': self._offset,
        'packer': self._packer.state_dict(),
        'batches': self._batches,
    }

  def _produce(self) -> tuple[np.ndarray, dict[str, Any]]:
    rows = []
    while len(rows) < self._batch_size:
      window = self._packer.pop()
      if window is not None:
        rows.append(window)
        continue
      if not self._pending:
        self._read_more()
      doc, tokens = self._pending[0]
      # Feed at most one window's worth, so the packer (and the state) stays small.
      take = tokens[self._offset:self._offset + self._packer.window - self._packer.buffered]
      self._packer.add(take)
      self._offset += len(take)
      if self._offset == len(tokens):
        self._pending.popleft()
        self._after = doc.position.next()
        self._offset = 0
    self._batches += 1
    return np.stack(rows), self._snapshot()

  def _read_more(self) -> None:
    if self._docs is None:
      self._docs = self._training_documents()
    docs = [doc for _, doc in zip(range(self._encode_docs), self._docs)]
    if self._offset and docs[0].position != self._after:
      raise ValueError(f'data state does not match the data: no document at {self._after}')
    for doc, ids in zip(docs, self._tokenizer.encode_batch([d.text for d in docs])):
      self._pending.append((doc, self._packer.wrap(ids)))

  def _training_documents(self) -> Iterator[sources.Document]:
    last_epoch_used = self._start_pos.epoch
    for doc in sources.documents(self._source, self._start_pos, repeat=True, seed=self._seed):
      if doc.position.epoch - last_epoch_used >= 2:  # A whole epoch gave nothing.
        raise ValueError(
            f'process {self._process_index} of {self._process_count} has no training '
            'documents: the source has too few, or data.eval_fraction holds them all out')
      if (doc.position.index % self._process_count != self._process_index
          or not doc.text or split.is_heldout(doc.key, self._cfg.eval_fraction)):
        continue
      last_epoch_used = doc.position.epoch
      yield doc

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
) -> list[np.ndarray]:
  """Up to num_batches batches [batch_size, seq_len + 1] of held-out documents.

  Every process packs the same held-out stream into global batches of
  batch_size * process_count rows and keeps its own rows, so all processes get the
  same number of batches and the set does not depend on the process count. One pass
  in listed order: every call returns the same batches.
  """
  _check_sizes(batch_size, seq_len, process_index, process_count)
  if num_batches <= 0:
    return []
  source = sources.open_source(cfg)
  packer = Packer(seq_len, tokenizer.eos_id, tokenizer.bos_id if add_bos else None)
  global_rows = batch_size * process_count
  wanted = num_batches * global_rows
  windows: list[np.ndarray] = []
  heldout = (
      doc for doc in sources.documents(source, repeat=False)
      if doc.text and split.is_heldout(doc.key, cfg.eval_fraction))
  any_docs = False
  for docs in _chunks(heldout, 16):
    any_docs = True
    for ids in tokenizer.encode_batch([d.text for d in docs]):
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
  return [np.stack(windows[i:i + batch_size]) for i in first]


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
