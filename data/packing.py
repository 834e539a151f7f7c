"""Packs documents end to end into fixed windows of seq_len + 1 tokens."""

from collections.abc import Sequence
from typing import Any

import numpy as np

# Token rows [B, seq_len + 1], or {'tokens', 'segment_ids'} of that shape.
Batch = np.ndarray | dict[str, np.ndarray]


class Packer:
  """Concatenates documents ([BOS] ids EOS) and cuts the stream into windows.

  Each window holds seq_len + 1 tokens: inputs are window[:-1], targets window[1:].
  Consecutive windows share one token (the last of one is the first of the next), so
  every next-token pair of the stream is trained on exactly once. Tokens that do not
  yet fill a window are carried over to the next document.
  """

  def __init__(self, seq_len: int, eos_id: int, bos_id: int | None = None):
    if seq_len < 1:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    self.seq_len = seq_len
    self.eos_id = eos_id
    self.bos_id = bos_id  # None: no BOS before documents.
    # Tokens waiting for a window are self._buffer[self._start:]; popping advances
    # _start and compacts now and then, so a long document is not shifted per window.
    self._buffer: list[int] = []
    self._start = 0

  @property
  def window(self) -> int:
    return self.seq_len + 1

  @property
  def buffered(self) -> int:
    """Tokens waiting for a window."""
    return len(self._buffer) - self._start

  def wrap(self, ids: Sequence[int]) -> list[int]:
    """A document's tokens as they enter the stream."""
    head = [] if self.bos_id is None else [self.bos_id]
    return head + _ints(ids) + [self.eos_id]

  def add_document(self, ids: Sequence[int]) -> None:
    self.add(self.wrap(ids))

  def add(self, tokens: Sequence[int]) -> None:
    """Appends raw stream tokens (already wrapped): Python ints or a numpy array."""
    self._buffer.extend(_ints(tokens))

  def pop(self) -> np.ndarray | None:
    """The next full window as int32 [seq_len + 1], or None if there is not one yet."""
    if self.buffered < self.window:
      return None
    out = np.asarray(self._buffer[self._start:self._start + self.window], dtype=np.int32)
    self._start += self.seq_len  # Keep the shared last token.
    if self._start > len(self._buffer) // 2:
      del self._buffer[:self._start]
      self._start = 0
    return out

  def state_dict(self) -> dict[str, Any]:
    return {'buffer': self._buffer[self._start:]}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self._buffer = [int(t) for t in state['buffer']]
    self._start = 0


def _ints(ids: Sequence[int] | np.ndarray) -> list[int]:
  # Token ids are Python ints (as sentencepiece returns them) or a numpy array; either
  # becomes a list of Python ints in C, not per token in Python, and the state stays
  # JSON-able.
  if isinstance(ids, np.ndarray):
    return ids.tolist()
  return list(ids)


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
