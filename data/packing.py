"""Packing: documents wrapped as [BOS] ids EOS, end to end, cut into seq_len + 1 windows.

`wrap` and `Windower` are the one wrapping and the one windowing that training
(data/dealing.py's packing streams), held-out batches (data/heldout.py) and file scoring
(lm/eval_run.py) share, so the three pack text alike. `segment_ids` and `batch` give rows
the form the trainer takes.
"""

import collections
from collections.abc import Sequence

import numpy as np

# Token rows [B, seq_len + 1], or {'tokens', 'segment_ids'} of that shape.
Batch = np.ndarray | dict[str, np.ndarray]


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


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Which document each token of a row belongs to, numbered from 1 in every row.

  A document's EOS belongs to it and the next token starts a new segment. sentencepiece
  never emits the EOS id for text, so EOS marks every document end and nothing else;
  the ids follow from the tokens alone and need no state.
  """
  ends = (tokens == eos_id).astype(np.int32)
  out = np.ones(tokens.shape, np.int32)
  out[..., 1:] += np.cumsum(ends[..., :-1], axis=-1, dtype=np.int32)
  return out


def batch(tokens: np.ndarray, eos_id: int, with_segments: bool) -> Batch:
  """Rows as the trainer takes them: plain, or with their segment ids (data.segment_ids)."""
  if not with_segments:
    return tokens
  return {'tokens': tokens, 'segment_ids': segment_ids(tokens, eos_id)}


def check_sizes(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
  """Raises ValueError for a batch shape or process that no batches can have."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
