"""From a request's new token ids to the text it returns: one piece per token, stop strings.

Each token's piece is what it adds to the decoded text (a character still missing bytes
adds nothing until its last byte arrives), so the pieces always concatenate to the text.
A piece that may be the start of a stop string is held back until the next tokens show
whether it is; at a stop string the text ends just before it, and so do the pieces.
Streamed and whole responses read the same pieces, so their texts are equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

_UNFINISHED = '\ufffd'  # What decoding makes of a character whose bytes are incomplete.


@dataclasses.dataclass
class Piece:
  """One token's share of the text, and whatever the caller attached to it (logprobs)."""

  text: str
  extra: Any = None


class TextStream:
  """Feeds token ids in, lets finished pieces out (`add`, then `flush` at the end)."""

  def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
    self._decode = decode
    self._stop = [s for s in stop if s]
    self._ids: list[int] = []
    self._decoded = ''  # The stable text of every id so far.
    self._held: list[Piece] = []
    self._unfinished = False  # The last id ends inside a character.
    self.text = ''  # What has been let out.
    self.stopped = False  # A stop string was reached.

  def add(self, token: int, extra: Any = None) -> list[Piece]:
    """The pieces that are final once `token` is known (maybe none)."""
    if self.stopped:
      return []
    self._ids.append(token)
    full = self._decode(self._ids)
    stable = full.rstrip(_UNFINISHED)
    self._unfinished = stable != full
    self._held.append(Piece(stable[len(self._decoded):], extra))
    self._decoded = stable
    return self._release(final=False)

  def flush(self) -> list[Piece]:
    """The pieces still held at the end of generation; a character left without all its
    bytes ends the last one as decoding shows it (U+FFFD)."""
    if self.stopped:
      return []
    if self._unfinished:
      full = self._decode(self._ids)
      self._held[-1].text += full[len(self._decoded):]
      self._decoded = full
    return self._release(final=True)

  def _release(self, final: bool) -> list[Piece]:
    held_text = ''.join(p.text for p in self._held)
    window = self.text + held_text
    cut = self._stop_at(window)
    if cut is not None:
      self.stopped = True
      keep = cut - len(self.text)  # Characters of the held text before the stop string.
    elif final:
      keep = len(held_text)
    else:
      keep = len(held_text) - self._stop_prefix(window)
    out, used = [], 0
    # The token a character is unfinished in waits for the bytes that complete it.
    last_waits = self._unfinished and not final
    while (self._held and used + len(self._held[0].text) <= keep
           and not (last_waits and len(self._held) == 1)):
      piece = self._held.pop(0)
      used += len(piece.text)
      out.append(piece)
    if self.stopped:
      if self._held and keep > used:  # The token the stop string begins inside.
        out.append(Piece(self._held[0].text[:keep - used], self._held[0].extra))
        used = keep
      self._held = []
    self.text += ''.join(p.text for p in out)
    return out

  def _stop_at(self, window: str) -> int | None:
    """Where the first stop string in `window` starts, searching only text that is new."""
    start = len(self.text)
    hits = []
    for s in self._stop:
      i = window.find(s, max(0, start - len(s) + 1))
      if i >= 0:
        hits.append(i)
    return min(hits) if hits else None

  def _stop_prefix(self, window: str) -> int:
    """The length of the longest tail of `window` that begins some stop string."""
    best = 0
    for s in self._stop:
      for n in range(min(len(s) - 1, len(window)), best, -1):
        if window.endswith(s[:n]):
          best = n
          break
    return best
