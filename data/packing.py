"""Packing: documents wrapped as [BOS] ids EOS, end to end, cut into seq_len + 1 windows;
fine-tuning examples packed whole into padded rows (RowPacker).

`wrap` and `Windower` are the one wrapping and the one windowing that training
(data/dealing.py's packing streams), held-out batches (data/heldout.py) and file scoring
(lm/eval/score_run.py) share, so the three pack text alike. data/batch.py gives the rows
the form the trainer takes.
"""

import collections
from collections.abc import Sequence

import numpy as np


def wrap(ids: Sequence[int], eos_id: int, bos_id: int | None = None) -> np.ndarray:
  """A document's token ids as they enter a stream: int32 [BOS] ids EOS (no BOS: None)."""
  head = 0 if bos_id is None else 1
  tokens = np.empty(head + len(ids) + 1, np.int32)
  if head:
    tokens[0] = bos_id
  tokens[head:-1] = ids
  tokens[-1] = eos_id
  return tokens


class Windower:
  """Token arrays end to end, cut into windows of seq_len + 1 tokens.

  Inputs are window[:-1], targets window[1:]. Consecutive windows share one token (the
  last of one is the first of the next), so every next-token pair of the stream is
  trained on exactly once. The arrays are held, not copied, until the next window
  starts after them.
  """

  def __init__(self, seq_len: int, offset: int = 0):
    if seq_len < 1:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    self.seq_len = seq_len
    # Where the next window starts in the first array held (or in the next one added,
    # while none is: a packing stream resuming inside a document).
    self.offset = offset
    self._pieces: collections.deque[np.ndarray] = collections.deque()
    self._held = 0  # Tokens in self._pieces.

  @property
  def pieces(self) -> int:
    """The arrays held: those the next window starts in or after."""
    return len(self._pieces)

  @property
  def buffered(self) -> int:
    """Tokens from the next window's start on."""
    return self._held - self.offset

  def add(self, tokens: np.ndarray) -> None:
    self._pieces.append(tokens)
    self._held += len(tokens)

  def pop(self, partial: bool = False) -> np.ndarray | None:
    """The next int32 [seq_len + 1] window, or None if not that many tokens are buffered.

    With `partial`, the last tokens (at least 2: one target) come as a shorter window.
    """
    size = self.seq_len + 1
    if self.buffered < size:
      if not partial or self.buffered < 2:
        return None
      size = self.buffered
    parts, start, left = [], self.offset, size
    for piece in self._pieces:
      part = piece[start:start + left]
      parts.append(part)
      left -= len(part)
      start = 0
      if not left:
        break
    self.offset += self.seq_len
    # Drop what the next window starts after; after a full window its first token is held.
    while self._pieces and self.offset >= len(self._pieces[0]):
      done = self._pieces.popleft()
      self.offset -= len(done)
      self._held -= len(done)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class RowPacker:
  """Whole examples (int32 [N, 2]: id, loss flag; data/sft.py) packed into rows.

  The interface of Windower, for fine-tuning: a row takes examples in order while they
  fit in seq_len + 1 tokens and is padded after them, so no example is split across
  rows and every row starts at an example. Rows come as int32 [seq_len + 1, 3]: the id,
  the loss flag and the example's number in the row (from 1; 0 for padding, which is id
  0 and never trained on). Examples must be at most seq_len + 1 tokens (data/sft.py cuts
  them); empty ones (skipped) pass through without a trace.
  """

  offset = 0  # Rows start at an example, never inside one.

  def __init__(self, seq_len: int):
    if seq_len < 1:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    self.seq_len = seq_len
    self._pieces: collections.deque[np.ndarray] = collections.deque()
    self._held = 0

  @property
  def pieces(self) -> int:
    return len(self._pieces)

  @property
  def buffered(self) -> int:
    """Tokens held: a row is decided once they reach seq_len + 1 (or with `partial`)."""
    return self._held

  def add(self, rows: np.ndarray) -> None:
    if len(rows) > self.seq_len + 1:
      raise ValueError(f'an example of {len(rows)} tokens does not fit a row of '
                       f'{self.seq_len + 1}')
    self._pieces.append(rows)
    self._held += len(rows)

  def pop(self, partial: bool = False) -> np.ndarray | None:
    """The next row, or None while it may still take another example."""
    size = self.seq_len + 1
    if self._held < size and not (partial and self._held):
      return None
    out = np.zeros((size, 3), np.int32)
    used, number = 0, 0
    while self._pieces and used + len(self._pieces[0]) <= size:
      piece = self._pieces.popleft()
      self._held -= len(piece)
      number += len(piece) > 0  # A skipped example leaves no trace.
      out[used:used + len(piece), :2] = piece
      out[used:used + len(piece), 2] = number
      used += len(piece)
    return out


def check_sizes(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
  """Raises ValueError for a batch shape or process that no batches can have."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
