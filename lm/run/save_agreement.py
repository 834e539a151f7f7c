"""Several processes agreeing on how a checkpoint save went, at the same step on all.

Orbax writes each process's shards in a background thread and meets the other processes
at barriers before it commits. When one process's write fails, its threads skip the
barrier the others wait at and wait at the next one; nobody hears of the error until
Orbax's barrier timeout (ten minutes), and by then the processes stand at different
steps. Two things here prevent that:

- `barrier` is the barrier Orbax's threads are given (AsyncOptions.barrier_sync_fn): a
  process that reaches one while unwinding an error posts the error to the coordination
  service's key-value store, and every barrier gives up as soon as any error is posted,
  so no thread waits on a save that cannot commit.
- `exchange` is a rendezvous the training loop makes at every step while a save is in
  flight: each process posts what it knows (saving, done, or failed and why) and reads
  everyone's. A save starts at the same step everywhere and the exchanges stop when all
  say done, which every process reads alike, so every process makes the same exchanges
  at the same steps and a failure on one stops all at the same step, with its message.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

SAVING, DONE, FAILED = 'saving', 'done', 'failed'
# Long enough for the slowest thing a process may do between two steps (an evaluation);
# a process that died is found sooner by the runtime's heartbeat.
BARRIER_TIMEOUT_MS = 30 * 60 * 1000
_POLL_SECONDS = 0.05


class SaveFailedElsewhere(RuntimeError):
  """Raised in Orbax's threads to end a barrier once a process posted its error."""


class Client(Protocol):
  """What is used of jax's DistributedRuntimeClient."""

  def key_value_set(self, key: str, value: str) -> None: ...
  def key_value_dir_get(self, key: str) -> list[tuple[str, str]]: ...
  def key_value_delete(self, key: str) -> None: ...
  def wait_at_barrier(self, barrier_id: str, timeout_in_ms: int) -> None: ...


class SaveAgreement:
  """Exchanges each process's save status; every call is a rendezvous of all processes."""

  def __init__(self, client: Client, process_index: int, process_count: int, *,
               describe: Callable[[BaseException], str],
               prefix: str = 'lm_checkpoint_save') -> None:
    """describe: an error as the one line posted to the others (the checkpointer's own)."""
    self.client, self.index, self.count, self.prefix = (client, process_index,
                                                        process_count, prefix)
    self.describe = describe
    self._round = 0
    self._entered: collections.Counter[str] = collections.Counter()
    self.local_error = ''  # This process's part of the save failed, as posted.

  def failures(self) -> list[tuple[str, str]]:
    """(key, error) of every process that posted its error."""
    return self.client.key_value_dir_get(f'{self.prefix}/failed/')

  def first_failure(self) -> dict[str, Any] | None:
    """{'process', 'error'} of the lowest process that posted its error, if any did."""
    posted = [(int(key.rsplit('/', 1)[1]), error) for key, error in self.failures()]
    if not posted:
      return None
    process, error = min(posted)
    return {'process': process, 'error': error}

  def barrier(self, *, key: str, timeout_ms: int) -> None:
    """Orbax's barrier (`barrier_sync_fn`), that ends early with SaveFailedElsewhere once
    any process posted an error; posts this process's error when reached unwinding one."""
    unwinding = sys.exc_info()[1]
    if unwinding is not None and not isinstance(unwinding, SaveFailedElsewhere):
      self._post_error(unwinding)
    # Orbax reuses some keys save after save; every process reaches each the same number
    # of times, so the count tells the rounds apart.
    self._entered[key] += 1
    here = f'{self.prefix}/barrier/{key}/{self._entered[key]}/'
    self.client.key_value_set(f'{here}{self.index}', '')
    deadline = time.monotonic() + timeout_ms / 1000
    while len(self.client.key_value_dir_get(here)) < self.count:
      failed = self.failures()
      if failed:
        raise SaveFailedElsewhere(f'a save failed: {failed[0][1]}')
      if time.monotonic() > deadline:
        raise TimeoutError(f'checkpoint barrier {key}: not every process arrived in '
                           f'{timeout_ms / 1000:.0f} s')
      time.sleep(_POLL_SECONDS)

  def _post_error(self, error: BaseException) -> None:
    if not self.local_error:
      self.local_error = self.describe(error)
      self.client.key_value_set(f'{self.prefix}/failed/{self.index}', self.local_error)

  def exchange(self, state: str, error: str = '') -> list[dict[str, Any]]:
    """Posts this process's state and returns every process's, in process order:
    [{'process': i, 'state': SAVING | DONE | FAILED, 'error': str}, ...]."""
    key = f'{self.prefix}/{self._round}/'
    self.client.key_value_set(f'{key}{self.index}',
                              json.dumps({'process': self.index, 'state': state,
                                          'error': error}))
    self.client.wait_at_barrier(f'{self.prefix}_{self._round}', BARRIER_TIMEOUT_MS)
    posted = sorted((json.loads(value) for _, value in self.client.key_value_dir_get(key)),
                    key=lambda s: s['process'])
    if self.index == 0 and self._round:  # Everyone has read the previous round by now.
      self.client.key_value_delete(f'{self.prefix}/{self._round - 1}/')
    self._round += 1
    if len(posted) != self.count:
      raise RuntimeError(f'save status: {len(posted)} of {self.count} processes posted')
    return posted


def outcome(posted: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
  """DONE when every process is done, FAILED (with the first failed status) when any
  failed, else SAVING."""
  failed = [s for s in posted if s['state'] == FAILED]
  if failed:
    return FAILED, failed[0]
  if all(s['state'] == DONE for s in posted):
    return DONE, None
  return SAVING, None
