"""Continuous batching: requests wait in a queue, take a free decode slot, leave at once.

One thread drives the engine (lm/serve/engine.py). Each turn it prefills waiting
requests into free slots, then runs one decode step for every busy slot and hands each
request its new pieces of text (lm/serve/text.py). A request that finishes (EOS, a stop
string, max_tokens) or is cancelled (its client went away) frees its slot before the
next step, so a long request never holds up the others and a new one starts within a
step. The host side of this thread is plain Python on small arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lm.serve.engine import Engine, Knobs, Picked
from lm.serve.text import Piece, TextStream

log = logging.getLogger(__name__)


class Busy(RuntimeError):
  """Every slot is taken and the queue is full: the client should retry later."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """What a request asks for; the API checks the ranges (lm/serve/protocol.py)."""

  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop: tuple[str, ...] = ()
  logprobs: int | None = None  # Alternatives per token; None = no logprobs at all.


@dataclasses.dataclass
class Token:
  """A generated token as the API reports it (the `extra` of its text piece)."""

  id: int
  logprob: float
  top: list[tuple[int, float]]  # The requested number of (id, logprob), most likely first.


@dataclasses.dataclass
class Event:
  """What a request learns after a turn: new pieces and, at the end, why it ended."""

  pieces: list[Piece]
  finish: str | None = None  # 'stop' (EOS or a stop string) or 'length'.
  completion_tokens: int = 0
  error: str | None = None


class Request:
  """One generation: its prompt ids, settings, and where its events go."""

  def __init__(self, prompt: Sequence[int], sampling: Sampling,
               deliver: Callable[[Event], None]) -> None:
    self.prompt = list(prompt)
    self.sampling = sampling
    self.deliver = deliver
    self.cancelled = False
    self.generated = 0
    self.stream: TextStream | None = None


class Scheduler:
  """Owns the engine's slots; `submit` and `cancel` are safe from any thread."""

  def __init__(self, engine: Engine, decode: Callable[[Sequence[int]], str], eos_id: int,
               max_waiting: int = 64) -> None:
    self.engine = engine
    self.decode = decode
    self.eos_id = eos_id
    self.max_waiting = max_waiting
    n = engine.slots
    self._slots: list[Request | None] = [None] * n
    self._last = np.zeros(n, np.int32)
    self._positions = np.full(n, -1, np.int32)
    self._waiting: collections.deque[Request] = collections.deque()
    self._wake = threading.Condition()
    self._closed = False
    self.failure: str | None = None  # Set if the engine failed: the server then answers 503.
    self.steps = 0
    self._thread = threading.Thread(target=self._run, name='decode-loop', daemon=True)

  def start(self) -> None:
    self._thread.start()

  def close(self) -> None:
    with self._wake:
      self._closed = True
      self._wake.notify()
    self._thread.join(timeout=30)

  def submit(self, req: Request) -> None:
    with self._wake:
      if self.failure:
        raise RuntimeError(self.failure)
      if len(self._waiting) >= self.max_waiting:
        raise Busy(f'all {self.engine.slots} decode slots are busy and {self.max_waiting} '
                   'requests wait already; retry later')
      self._waiting.append(req)
      self._wake.notify()

  def cancel(self, req: Request) -> None:
    """Frees the request's slot before the next step (or drops it from the queue)."""
    with self._wake:
      req.cancelled = True
      self._wake.notify()

  def load(self) -> dict[str, int]:
    """Busy slots, waiting requests, decode steps so far."""
    with self._wake:
      busy = sum(r is not None for r in self._slots)
      return {'slots': self.engine.slots, 'busy': busy, 'waiting': len(self._waiting),
              'steps': self.steps}

  def _run(self) -> None:
    try:
      while True:
        with self._wake:
          self._drop_cancelled()
          while not self._closed and not self._waiting and not any(self._slots):
            self._wake.wait()
          if self._closed:
            return
          admitted = self._admit()
        for slot, req in admitted:
          self._start(slot, req)
        if any(self._slots):
          self._step()
    except Exception as e:  # noqa: BLE001  Every waiting client hears why, then 503s.
      log.exception('the decode loop failed')
      self._fail(f'the decode loop failed: {e}')

  def _drop_cancelled(self) -> None:
    for slot, req in enumerate(self._slots):
      if req is not None and req.cancelled:
        self._free(slot)
    self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

  def _admit(self) -> list[tuple[int, Request]]:
    out = []
    for slot, req in enumerate(self._slots):
      if req is None and self._waiting:
        req = self._waiting.popleft()
        self._slots[slot] = req
        out.append((slot, req))
    return out

  def _knobs(self, reqs: Sequence[Request | None]) -> Knobs:
    s = [r.sampling if r is not None else Sampling(max_tokens=1, temperature=0.0)
         for r in reqs]
    count = [r.generated if r is not None else 0 for r in reqs]
    return Knobs(jnp.asarray([x.temperature for x in s], jnp.float32),
                 jnp.asarray([x.top_p for x in s], jnp.float32),
                 jnp.asarray([x.top_k for x in s], jnp.int32),
                 jnp.asarray([x.seed for x in s], jnp.int32),
                 jnp.asarray(count, jnp.int32))

  def _start(self, slot: int, req: Request) -> None:
    req.stream = TextStream(self.decode, req.sampling.stop)
    picked = self.engine.prefill(slot, req.prompt, self._knobs([req]))
    self._positions[slot] = len(req.prompt)
    self._take(slot, picked, 0)

  def _step(self) -> None:
    picked = self.engine.step(self._last, self._positions, self._knobs(self._slots))
    self.steps += 1
    for slot, req in enumerate(self._slots):
      if req is not None:
        self._positions[slot] += 1
        self._take(slot, picked, slot)

  def _take(self, slot: int, picked: Picked, row: int) -> None:
    """Hands row `row` of `picked` to the request in `slot`; frees the slot at its end."""
    req = self._slots[slot]
    token = int(picked.token[row])
    req.generated += 1
    self._last[slot] = token
    finish, pieces = None, []
    if token == self.eos_id:
      finish, pieces = 'stop', req.stream.flush()
    else:
      n = req.sampling.logprobs or 0
      top = [(int(i), float(lp)) for i, lp in
             zip(picked.top_ids[row][:n], picked.top_logprobs[row][:n])]
      pieces = req.stream.add(token, Token(token, float(picked.logprob[row]), top))
      if req.stream.stopped:
        finish = 'stop'
      elif req.generated >= req.sampling.max_tokens:
        finish, pieces = 'length', pieces + req.stream.flush()
    req.deliver(Event(pieces, finish, req.generated))
    if finish:
      with self._wake:
        self._free(slot)

  def _free(self, slot: int) -> None:
    self._slots[slot] = None
    self._positions[slot] = -1

  def _fail(self, message: str) -> None:
    with self._wake:
      self.failure = message
      stranded = [r for r in self._slots if r is not None] + list(self._waiting)
      self._slots = [None] * len(self._slots)
      self._waiting.clear()
    for req in stranded:
      req.deliver(Event([], error=message))

  def warm_up(self) -> dict[str, Any]:
    """Compiles every bucket's prefill and the step before the first request (call it
    before `start`); the number of programs and the seconds it took."""
    start = time.perf_counter()
    engine = self.engine
    # Twice: on a mesh the fresh cache may be laid out unlike the one the programs return,
    # and the second pass compiles those variants too.
    for _ in range(2):
      for b in engine.buckets:
        engine.prefill(0, [0] * b, self._knobs([None]))
      engine.step(self._last, self._positions, self._knobs(self._slots))
    # Row 0 holds a dummy prompt now; no request owns it and the next prefill replaces it.
    return {'programs': engine.compiled(), 'seconds': round(time.perf_counter() - start, 2)}
