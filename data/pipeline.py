"""Training and held-out batches: read, clean, tokenise, pack; resumable exactly.

Layout. The training documents form one sequence that is dealt, by characters, to
packing streams; each row of a batch is the next window of one stream, and each process
tokenises only its own streams' documents (data/dealing.py says how and why).

State. Per stream, where its next window starts: a document number and a token offset
into that document (a stream that has not started yet: the document from which on it
takes what is dealt to it). And the reader's state (per source a position and counters,
and the mixture's counter) at a document no later than any the streams still need, with
the characters dealt to each stream before that document. Restoring reads and deals on
from there and skips what the streams had already taken, so batches continue bit for
bit. A process's state_dict() holds its own streams; TrainBatches.merge_states joins
every process's into one global state, which any process count restores.

Hub sources split across hosts are the exception: each host streams its own rows
(data/sources.py), so with several processes and a hub source each process numbers its
own documents and deals them, as above, to K / process_count streams of its own. Its
batches then depend on the process count, and its state resumes only with the same
process count.
"""

import copy
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from data import cleaning, dealing, packing, sources
from data import reader as reader_lib
from data.config import DataConfig
from data.tokenizer import Tokenizer

_STATE_VERSION = 4  # 4: documents dealt by characters; 3: dealt n % K.
_T = TypeVar('_T')
Batch = packing.Batch
log = logging.getLogger(__name__)


class TrainBatches:
  """Endless int32 batches [batch_size, seq_len + 1]: this process's rows of each global batch.

  With data.segment_ids each batch is a dict {'tokens', 'segment_ids'} of that shape
  instead (see packing.segment_ids). The global batch, every process's rows in process
  order, does not depend on the process count (see the module docstring for the layout
  and the one exception, hub sources). No document is tokenised into two processes'
  rows; held-out and cleaned-out documents are skipped. `state_dict()` describes the
  batches handed out so far, never prefetched ones. With prefetch > 0 a background
  thread reads, encodes and packs that many batches ahead; call `close()` (or use
  `with`) to stop it early.

  Saving and restoring: single process, `state_dict()` and `load_state_dict(state)`.
  Several processes: gather every process's `state_dict()`, store
  `TrainBatches.merge_states(states)`, and on restore give that merged state to
  `load_state_dict` on every process, whatever their number.
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
    packing.check_sizes(batch_size, seq_len, process_index, process_count)
    self._cfg = cfg
    self._reader = reader_lib.MixtureReader(
        cfg, seed=seed, process_index=process_index, process_count=process_count)
    self._layout = dealing.Layout.make(cfg, batch_size, process_index, process_count,
                                self._reader.per_process)
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._process_index = process_index
    self._process_count = process_count
    self._seed = seed
    self._bos = tokenizer.bos_id if add_bos else None
    self._prefetch = prefetch
    self._threads = cfg.encode_threads or os.cpu_count() or 1
    self._dealer = dealing.Dealer(self._reader, self._layout.num_streams, self._encode, encode_docs)
    self._streams: dict[int, dealing.Stream] = {}
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._reset(self._fresh(self._reader.state_dict(), 0))

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
    """JSON-serialisable state after the last batch handed out: this process's part.

    With several processes, TrainBatches.merge_states of every process's part is the
    state to store. Keys: 'version', 'layout', 'num_streams', 'batches' (global batches
    handed out), 'streams' ({stream index as a string: {'next', 'offset'[, 'key']}}),
    'reader' (the reader state to read on from), 'dealt' (the characters dealt to each
    stream before it, less their minimum), and for checks and readers 'shard_names',
    'seed', 'process_index', 'process_count'.
    """
    state = copy.deepcopy(self._state)
    readers = zip(self._reader.readers, state['reader']['sources'])
    state.update(
        shard_names=[r.shard_name(sources.Position.from_dict(s['position']))
                     for r, s in readers],
        seed=self._seed,
        process_index=self._process_index,
        process_count=self._process_count,
    )
    return state

  @staticmethod
  def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every process's state_dict(), in any order: what to store.

    It holds every packing stream and the earliest reader state among them with the
    characters dealt before it, so any number of processes restores it with
    load_state_dict (each keeps its own streams).
    A per-process state (a hub source split per host) becomes the list of all of them,
    which restores with the same process count only.
    """
    states = [copy.deepcopy(dict(s)) for s in states]
    if not states:
      raise ValueError('merge_states needs the state of every process; got none')
    if len(states) == 1:
      return states[0]
    first = states[0]
    for s in states:
      if s.get('version') != _STATE_VERSION:
        raise ValueError(f'merge_states takes version-{_STATE_VERSION} data states; got '
                         f'version {s.get("version")!r}')
    n = len(states)
    indices = sorted(int(s['process_index']) for s in states)
    if indices != list(range(n)) or {int(s['process_count']) for s in states} != {n}:
      raise ValueError(
          f'merge_states needs the state of each of the processes once; got process '
          f'indices {indices} of process counts '
          f'{sorted({s["process_count"] for s in states})}')
    for key in ('layout', 'num_streams', 'batches', 'seed'):
      if len({s.get(key) for s in states}) != 1:
        raise ValueError(f'data states of different processes disagree on {key!r}: '
                         f'{[s.get(key) for s in states]}')
    states.sort(key=lambda s: int(s['process_index']))
    if first['layout'] == dealing.PER_PROCESS:
      return {'version': _STATE_VERSION, 'layout': dealing.PER_PROCESS, 'process_count': n,
              'processes': states}
    streams: dict[str, Any] = {}
    for s in states:
      for j, stream in s['streams'].items():
        if j in streams:
          raise ValueError(f'data states of two processes both hold packing stream {j}')
        streams[j] = stream
    if len(streams) != int(first['num_streams']):
      raise ValueError(f'data states hold {len(streams)} of {first["num_streams"]} packing '
                       'streams; merge the state of every process')
    # The reader state to read on from, with the characters dealt before it (its 'dealt').
    earliest = min(states, key=lambda s: int(s['reader']['counter']))
    merged = dict(earliest, process_count=n,
                  streams=dict(sorted(streams.items(), key=lambda item: int(item[0]))))
    del merged['process_index']
    return merged

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Continues from `state`: the next batch is the one after it was taken.

    `state` is a merged state (TrainBatches.merge_states) or a single process's
    state_dict() that holds this process's streams (one saved by a single process, or
    by this process with the same process count).
    """
    version = state.get('version')
    if version not in (1, 2, 3, _STATE_VERSION):
      raise ValueError(f'data state version {version!r} is not one this code reads (1 to '
                       f'{_STATE_VERSION}); was it written by a newer version?')
    state = self._own_part(self._upgrade(state))
    if state.get('layout') != self._layout.kind:
      raise ValueError(
          f'data state numbers documents {_LAYOUT_WORDS.get(state.get("layout"), "?")}, '
          f'this run {_LAYOUT_WORDS[self._layout.kind]}: a hub source split per host '
          '(several processes) resumes only with the process count it was saved with')
    reader_state = state['reader']
    if len(reader_state['sources']) != len(self._reader.readers):
      raise ValueError(
          f'data state has {len(reader_state["sources"])} sources but the config names '
          f'{len(self._reader.readers)}; did data.mixture change?')
    names = state.get('shard_names') or [None] * len(reader_state['sources'])
    for i, (s, name) in enumerate(zip(reader_state['sources'], names)):
      self._check_shard(i, s['position'], name)
    saved = state['streams']
    counter, batches = int(reader_state['counter']), int(state['batches'])
    self.close()
    if int(state['num_streams']) != self._layout.num_streams or state.get('version') == 3:
      # Another data.streams or global batch size, or streams dealt in turn (version 3):
      # rather than failing the resume, fresh streams start at the first document no
      # stream had started. What the streams were packing is not finished, and documents
      # read for a stream that had not reached them are skipped.
      start = max([int(s['next']) + (int(s['offset']) > 0) for s in saved.values()]
                  + [counter])
      if state.get('version') == 3:
        log.warning('data state version 3 dealt documents to streams in turn; resuming '
                    'with fresh streams, dealt by characters, from document %d', start)
      else:
        log.warning('data state has %s packing streams, resuming with %d from document %d',
                    state['num_streams'], self._layout.num_streams, start)
      self._reset(self._state)  # Rebuilt from its own state if what follows fails.
      new = self._fresh(self._read_on(reader_state, start), batches)
    else:
      owned = self._layout.owned()
      missing = [j for j in owned if str(j) not in saved]
      if missing:
        raise ValueError(
            f'data state lacks {len(missing)} packing streams of process '
            f'{self._process_index} (first: {missing[0]}); restore from '
            "TrainBatches.merge_states of every process's state_dict()")
      new = self._fresh(reader_state, batches)
      new['streams'] = {str(j): dict(saved[str(j)]) for j in owned}
      new['dealt'] = [int(x) for x in state['dealt']]
      if len(new['dealt']) != self._layout.num_streams:
        raise ValueError(f'data state deals documents to {len(new["dealt"])} streams, not '
                         f'{self._layout.num_streams}')
      late = min(owned, key=lambda j: int(saved[str(j)]['next']))
      if int(saved[str(late)]['next']) < counter:
        raise ValueError(
            f'data state reads on from document {counter}, after document '
            f'{saved[str(late)]["next"]} that stream {late} still needs; restore from '
            "TrainBatches.merge_states of every process's state_dict()")
    self._reset(new)
    self._build()  # Now, so that a state that does not match the data fails here.

  def stats(self) -> dict[str, Any]:
    """Document counts of the batches handed out: per source and summed over sources.

    The counts are of every process's documents (except next to a hub source split per
    host: this process's), over every epoch, up to the earliest document this process's
    streams still use: 'kept', 'heldout', and the cleaning drops 'empty', 'short',
    'duplicate', 'binary' (a state saved before 'binary' existed counts it from 0).
    """
    per_source = [{**cleaning.zero_counts(), **s['counts']}
                  for s in self._state['reader']['sources']]
    total = {k: sum(c.get(k, 0) for c in per_source) for k in cleaning.zero_counts()}
    return {'total': total,
            'sources': [dict(c, source=r.label) for c, r in zip(per_source, self._reader.readers)]}

  def _check_shard(self, source: int, pos: dict[str, int], name: str | None) -> None:
    expected = self._reader.readers[source].shard_name(sources.Position.from_dict(pos))
    if name is not None and name != expected:
      raise ValueError(
          f'data state points into {name!r} but the data now has {expected!r} there; '
          'did data.files or the data change?')

  def _own_part(self, state: dict[str, Any]) -> dict[str, Any]:
    """This process's state out of a merged per-process one; checks a single one."""
    if state.get('layout') != dealing.PER_PROCESS or self._layout.kind != dealing.PER_PROCESS:
      return state
    saved = int(state.get('process_count', self._process_count))
    if saved != self._process_count:
      raise ValueError(
          f'data state was saved by {saved} processes that each read their own rows of a '
          f'hub source (data/sources.py); it resumes only on {saved} processes, not '
          f'{self._process_count}')
    if 'processes' in state:
      return state['processes'][self._process_index]
    if int(state.get('process_index', self._process_index)) != self._process_index:
      raise ValueError(
          f'data state of process {state["process_index"]} given to process '
          f'{self._process_index}; restore from TrainBatches.merge_states of every '
          "process's state_dict()")
    return state

  def _upgrade(self, state: dict[str, Any]) -> dict[str, Any]:
    """Reads a version-1 or -2 state (streams filled on demand) as a current one.

    Those layouts cannot be continued exactly: fresh streams start at the first
    document no stream had taken, and the rest of the documents in progress is lost.
    """
    version = state.get('version')
    if version not in (1, 2):
      return state
    if version == 1:
      pos = sources.Position.from_dict(state['position'])
      if int(state['offset']):
        pos = pos.next()
      reader_state = {'counter': 0, 'sources': [{'position': pos.to_dict(), 'counts': {}}]}
      names = [state.get('shard_name')]
    else:
      reader_state = state['reader']
      names = state.get('shard_names')
    log.warning('data state version %d: resuming at the first document its streams had '
                'not taken; the documents they were packing are not finished', version)
    return dict(self._fresh(reader_state, int(state['batches'])), shard_names=names)

  # Producing batches.

  def _fresh(self, reader_state: dict[str, Any], batches: int) -> dict[str, Any]:
    """A state whose streams start empty at the reader's document, nothing dealt yet."""
    k = self._layout.num_streams
    start = int(reader_state['counter'])
    return {
        'version': _STATE_VERSION,
        'layout': self._layout.kind,
        'num_streams': k,
        'batches': batches,
        'streams': {str(j): {'next': start, 'offset': 0} for j in self._layout.owned()},
        'reader': reader_state,
        'dealt': [0] * k,
    }

  def _read_on(self, reader_state: dict[str, Any], start: int) -> dict[str, Any]:
    """The reader's state at document `start`, reading on from `reader_state`."""
    self._reader.load_state_dict(reader_state)
    while self._reader.counter < start:
      self._reader.next()
    return self._reader.state_dict()

  def _encode(self, texts: list[str]) -> list[np.ndarray]:
    """Documents as they enter a stream: int32 [BOS] ids EOS."""
    return [packing.wrap(ids, self._tokenizer.eos_id, self._bos)
            for ids in self._tokenizer.encode_batch(texts, num_threads=self._threads)]

  def _reset(self, state: dict[str, Any]) -> None:
    """Sets what is handed out next; the streams are rebuilt from it on the next batch."""
    self._state = state
    self._built = False
    self._error = None
    self._queue = queue.Queue(maxsize=max(self._prefetch, 1))

  def _build(self) -> None:
    state = self._state
    self._streams = {}
    for j, saved in state['streams'].items():
      stream = dealing.Stream(int(j), self._seq_len)
      stream.load_state_dict(saved)
      self._streams[int(j)] = stream
    self._dealer.restart(state['reader'], state['dealt'],
                          {j: s.next for j, s in self._streams.items()})
    for stream in self._streams.values():
      if stream.offset:  # Re-reads the document now: a changed one fails here.
        stream.fill(self._dealer.take, 1)
    self._batches = int(state['batches'])
    self._built = True

  def _snapshot(self) -> dict[str, Any]:
    held = [s.first for s in self._streams.values() if s.first is not None]
    reader_state, dealt = self._dealer.checkpoint(held)
    streams = {}
    for j, s in self._streams.items():
      streams[str(j)] = s.state_dict()
      if s.first is None:  # Not started: nothing dealt to it before the reader state.
        streams[str(j)]['next'] = max(s.next, int(reader_state['counter']))
    return {
        'version': _STATE_VERSION,
        'layout': self._layout.kind,
        'num_streams': self._layout.num_streams,
        'batches': self._batches,
        'streams': streams,
        'reader': reader_state,
        'dealt': dealt,
    }

  def _produce(self) -> tuple[Batch, dict[str, Any]]:
    if not self._built:
      self._build()
    rows = [self._streams[self._layout.stream(self._batches, i)].window(self._dealer.take)
            for i in range(self._batch_size)]
    self._batches += 1
    batch = packing.batch(np.stack(rows), self._tokenizer.eos_id, self._cfg.segment_ids)
    return batch, self._snapshot()

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


_LAYOUT_WORDS = {dealing.GLOBAL: 'in one sequence for all processes',
                 dealing.PER_PROCESS: 'per process (a hub source split per host)'}


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
  packing.check_sizes(batch_size, seq_len, process_index, process_count)
  if num_batches <= 0:
    return []
  reader_lib.check_has_documents(cfg)  # Else an empty data file reads as 'holds out none'.
  windower = packing.Windower(seq_len)
  bos = tokenizer.bos_id if add_bos else None
  global_rows = batch_size * process_count
  wanted = num_batches * global_rows
  windows: list[np.ndarray] = []
  threads = cfg.encode_threads or os.cpu_count() or 1
  any_docs = False
  for docs in _chunks(reader_lib.single_pass(cfg, heldout=True), 16):
    any_docs = True
    for ids in tokenizer.encode_batch([d.text for d in docs], num_threads=threads):
      windower.add(packing.wrap(ids, tokenizer.eos_id, bos))
      while len(windows) < wanted and (window := windower.pop()) is not None:
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
  return [packing.batch(np.stack(windows[i:i + batch_size]), tokenizer.eos_id,
                        cfg.segment_ids) for i in first]


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
  it = iter(items)
  while chunk := [x for _, x in zip(range(size), it)]:
    yield chunk
