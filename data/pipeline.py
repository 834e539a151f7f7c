"""TrainBatches: training batches read, cleaned, tokenised, packed, prefetched; resumable.

Layout. The training documents form one sequence that is dealt, by characters, to
packing streams; each row of a batch is the next window of one stream, and each process
tokenises only its own streams' documents (data/dealing.py says how and why).

State. state_dict() says where every stream of this process is and where the reader
reads on, so that restoring continues bit for bit; TrainBatches.merge_states joins
every process's into one state that any process count restores (data/state.py).
"""

import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from data import dealing, formats, packing
from data import reader as reader_lib
from data import state as data_state
from data.batch import Batch, make_batch
from data.config import DataConfig
from data.tokenizer import Tokenizer


class TrainBatches:
  """Endless batches (data/batch.py) of rows [batch_size, seq_len + 1]: this process's
  rows of each global batch, with segment ids under data.segment_ids. The global batch,
  every process's rows in process order, does not depend on the process count (see the
  module docstring for the layout). No document is
  tokenised into two processes' rows; held-out and cleaned-out documents are skipped.
  `state_dict()` describes the batches handed out so far, never prefetched ones. With
  prefetch > 0 a background thread reads, encodes and packs that many batches ahead;
  call `close()` (or use `with`) to stop it early.

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
    self._reader = reader_lib.MixtureReader(cfg, seed=seed)
    self._layout = dealing.Layout.make(cfg, batch_size, process_index, process_count)
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    self._seq_len = seq_len
    self._process_index = process_index
    self._process_count = process_count
    self._seed = seed
    self._prefetch = prefetch
    encode = formats.of(cfg).encoder(tokenizer, seq_len, add_bos=add_bos,
                                     threads=cfg.encode_threads)
    self._dealer = dealing.Dealer(self._reader, self._layout.num_streams, encode, encode_docs)
    self._streams: dict[int, dealing.Stream] = {}
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue()
    self._error: BaseException | None = None
    self._reset(data_state.fresh(self._layout, self._reader.state_dict(), 0))

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
    state to store. What it holds: data/state.py.
    """
    return data_state.with_checks(self._state, self._reader, seed=self._seed,
                                  process_index=self._process_index,
                                  process_count=self._process_count)

  @staticmethod
  def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every process's state_dict(), in any order: what to store.

    Any number of processes restores it with load_state_dict (data/state.py's merge).
    """
    return data_state.merge(states)

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Continues from `state`: the next batch is the one after it was taken.

    `state` is a merged state (TrainBatches.merge_states) or a single process's
    state_dict() that holds this process's streams (one saved by a single process, or
    by this process with the same process count).
    """
    state = data_state.checked(state, self._reader)
    self.close()  # The prefetch thread reads with self._reader until it stops.
    if data_state.same_streams(state, self._layout):
      new = data_state.continued(state, self._layout, self._process_index)
    else:
      self._reset(self._state)  # Rebuilt from its own state if what follows fails.
      new = data_state.restreamed(state, self._layout, self._reader)
    self._reset(new)
    self._build()  # Now, so that a state that does not match the data fails here.

  # Producing batches.

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
      stream = dealing.Stream(int(j), self._seq_len, formats.of(self._cfg))
      stream.load_state_dict(saved)
      self._streams[int(j)] = stream
    self._dealer.restart(state['reader'], state['dealt'],
                         {j: s.next for j, s in self._streams.items()})
    for stream in self._streams.values():
      if stream.offset:  # Re-reads the document now: a changed one fails here.
        stream.fill(self._dealer.take, 1)
    self._batches = int(state['batches'])
    self._built = True

  def _produce(self) -> tuple[Batch, dict[str, Any]]:
    if not self._built:
      self._build()
    rows = [self._streams[self._layout.stream(self._batches, i)].window(self._dealer.take)
            for i in range(self._batch_size)]
    self._batches += 1
    batch = make_batch(np.stack(rows), self._tokenizer.eos_id, self._cfg.segment_ids)
    return batch, data_state.snapshot(self._layout, self._streams, self._dealer, self._batches)

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


def examples_summary(cfg: DataConfig, tokenizer: Tokenizer, seq_len: int) -> str:
  """Fine-tuning examples (data/formats.py): one line saying how many training examples
  there are and how many are truncated or skipped for length (data/sft.py's rules); ''
  for plain text.

  One pass over the training split before the run starts; a hub dataset, which may be
  endless, is not counted ahead.
  """
  from data import mixture, sft  # Only fine-tuning runs need them.

  if not formats.of(cfg).whole:
    return ''
  if any(c.source == 'hub' for _, c in mixture.components(cfg)):
    return (f'examples longer than {seq_len + 1} tokens (seq_len + 1) are truncated at the '
            'end; those whose prompt leaves no response token within them are skipped')
  docs = ((d.key, d.text) for d in reader_lib.single_pass(cfg, heldout=False))
  encode = formats.batch_encoder(tokenizer, cfg.encode_threads)
  counts = sft.count(docs, encode, tokenizer.bos_id, tokenizer.eos_id, seq_len + 1)
  if counts.examples and counts.skipped == counts.examples:  # Nothing left to train on.
    raise ValueError(f'seq_len: every one of the {counts.examples} training examples has a '
                     f'prompt that leaves no response token within seq_len + 1 = '
                     f'{seq_len + 1} tokens (first: {counts.first_skipped}); raise seq_len '
                     'or shorten the prompts')
  return f'training {counts.line(seq_len + 1)}'
