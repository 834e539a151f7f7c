"""OpenAI's response objects, whole or as stream chunks, from a request's events.

Completions: {"object": "text_completion", "choices": [{"text", "logprobs": {"tokens",
"token_logprobs", "top_logprobs", "text_offset"}, "finish_reason"}], "usage"}.
Chat: {"object": "chat.completion", "choices": [{"message": {"role", "content"},
"logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs"}]},
"finish_reason"}], "usage"}. Streams send the same pieces as chunks: a chat stream's
first chunk carries the assistant role; `finish_reason` is in exactly one chunk (the
last with a choice); with include_usage every chunk has "usage": null but a final one
with empty choices and the counts. Log-probabilities are the model's own (before
temperature, top-k and top-p); each token's text is its piece of the returned text, so
the tokens concatenate to it (text_offset counts from the start of the completion).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lm.serve.scheduler import Event, Token
from lm.serve.text import Piece


class Answer:
  """Collects one request's events and writes them in the wire format."""

  def __init__(self, chat: bool, model: str, rid: str, prompt_tokens: int,
               logprobs: int | None, piece_text: Callable[[int], str]) -> None:
    self.chat, self.model, self.id = chat, model, rid
    self.prompt_tokens = prompt_tokens
    self.logprobs = logprobs
    self.piece_text = piece_text
    self.created = int(time.time())
    self.pieces: list[Piece] = []
    self.finish: str | None = None
    self.completion_tokens = 0

  def add(self, event: Event) -> None:
    self.pieces += event.pieces
    self.completion_tokens = event.completion_tokens
    self.finish = event.finish or self.finish

  def usage(self) -> dict[str, int]:
    return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': self.completion_tokens,
            'total_tokens': self.prompt_tokens + self.completion_tokens}

  def whole(self) -> dict[str, Any]:
    choice = {'index': 0, 'logprobs': self._logprobs(self.pieces, 0),
              'finish_reason': self.finish}
    text = ''.join(p.text for p in self.pieces)
    if self.chat:
      choice['message'] = {'role': 'assistant', 'content': text}
    else:
      choice['text'] = text
    return {**self._head(), 'choices': [choice], 'usage': self.usage()}

  def opening(self, include_usage: bool) -> list[dict[str, Any]]:
    """The chunk before any text: the role, for chat."""
    if not self.chat:
      return []
    return [self._chunk({'role': 'assistant', 'content': ''}, None, None, include_usage)]

  def chunks(self, event: Event, include_usage: bool) -> list[dict[str, Any]]:
    offset = sum(len(p.text) for p in self.pieces)
    self.add(event)
    out = []
    if event.pieces:
      text = ''.join(p.text for p in event.pieces)
      delta = {'content': text} if self.chat else text
      out.append(self._chunk(delta, self._logprobs(event.pieces, offset), None, include_usage))
    if event.finish:
      out.append(self._chunk({} if self.chat else '', None, event.finish, include_usage))
      if include_usage:
        out.append({**self._head(chunk=True), 'choices': [], 'usage': self.usage()})
    return out

  def _head(self, chunk: bool = False) -> dict[str, Any]:
    kind = ('chat.completion' if self.chat else 'text_completion') + (
        '.chunk' if chunk and self.chat else '')
    return {'id': self.id, 'object': kind, 'created': self.created, 'model': self.model}

  def _chunk(self, delta: Any, logprobs: Any, finish: str | None,
             include_usage: bool) -> dict[str, Any]:
    choice = {'index': 0, 'logprobs': logprobs, 'finish_reason': finish}
    choice['delta' if self.chat else 'text'] = delta
    out = {**self._head(chunk=True), 'choices': [choice]}
    if include_usage:
      out['usage'] = None
    return out

  def _logprobs(self, pieces: list[Piece], offset: int) -> dict[str, Any] | None:
    if self.logprobs is None:
      return None
    tokens: list[Token] = [p.extra for p in pieces]
    if self.chat:
      return {'content': [
          {'token': p.text, 'logprob': t.logprob, 'bytes': list(p.text.encode()),
           'top_logprobs': [{'token': (s := self.piece_text(i)), 'logprob': lp,
                             'bytes': list(s.encode())} for i, lp in t.top]}
          for p, t in zip(pieces, tokens)], 'refusal': None}
    offsets, at = [], offset
    for p in pieces:
      offsets.append(at)
      at += len(p.text)
    return {'tokens': [p.text for p in pieces], 'token_logprobs': [t.logprob for t in tokens],
            'top_logprobs': [{self.piece_text(i): lp for i, lp in t.top} for t in tokens],
            'text_offset': offsets}
