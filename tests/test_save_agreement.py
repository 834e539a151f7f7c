"""lm/run/save_agreement.py on a stand-in for the coordination service, processes as threads.

The real thing, two training processes with one failing save, is in test_multiprocess.py.
"""

import threading
import time

import pytest

from lm.run.save_agreement import (
  DONE,
  FAILED,
  SAVING,
  SaveAgreement,
  SaveFailedElsewhere,
  outcome,
)


class FakeClient:
  """The key-value store and barriers of jax's coordination service, in memory."""

  def __init__(self):
    self.kv, self.lock = {}, threading.Condition()
    self.arrived: dict[str, int] = {}

  def key_value_set(self, key, value):
    with self.lock:
      self.kv[key] = value

  def key_value_dir_get(self, key):
    with self.lock:
      return sorted((k, v) for k, v in self.kv.items() if k.startswith(key))

  def key_value_delete(self, key):
    with self.lock:
      for k in [k for k in self.kv if k.startswith(key)]:
        del self.kv[k]

  def wait_at_barrier(self, barrier_id, timeout_in_ms, count=2):
    with self.lock:
      self.arrived[barrier_id] = self.arrived.get(barrier_id, 0) + 1
      self.lock.notify_all()
      if not self.lock.wait_for(lambda: self.arrived[barrier_id] >= count,
                                timeout_in_ms / 1000):
        raise TimeoutError(barrier_id)


def _agreement(client, process):
  """Process `process` of two; errors posted as str() gives them."""
  return SaveAgreement(client, process, 2, describe=str)


def _both(fn0, fn1):
  """Runs fn0 and fn1 as processes 0 and 1; returns their results (or exceptions)."""
  results = [None, None]

  def run(i, fn):
    try:
      results[i] = fn()
    except BaseException as e:  # noqa: BLE001
      results[i] = e
  threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((fn0, fn1))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(10)
  assert not any(t.is_alive() for t in threads)
  return results


def test_every_process_reads_every_status_in_process_order_and_the_outcome():
  client = FakeClient()
  a, b = (_agreement(client, i) for i in range(2))
  first = _both(lambda: a.exchange(DONE), lambda: b.exchange(SAVING))
  assert first[0] == first[1] == [{'process': 0, 'state': DONE, 'error': ''},
                                  {'process': 1, 'state': SAVING, 'error': ''}]
  assert outcome(first[0]) == (SAVING, None)
  second = _both(lambda: a.exchange(DONE), lambda: b.exchange(FAILED, 'disk full'))
  assert second[0] == second[1]
  assert outcome(second[0]) == (FAILED, {'process': 1, 'state': FAILED, 'error': 'disk full'})
  assert outcome([{'process': 0, 'state': DONE, 'error': ''}] * 2) == (DONE, None)
  # Process 0 drops each round's keys once everyone has read it.
  assert not [k for k, _ in client.kv.items() if k.startswith(f'{a.prefix}/0/')]


def _fails_then_waits(agreement):
  """Orbax's threads on the process whose write failed: the error skips one barrier, and
  the commit thread's `finally` waits at the next one."""
  try:
    raise OSError(28, 'No space left on device')
  finally:
    agreement.barrier(key='save_progress', timeout_ms=60_000)


def test_an_error_met_at_a_barrier_is_posted_and_ends_every_barrier_at_once():
  client = FakeClient()
  failing, waiting = _agreement(client, 0), _agreement(client, 1)
  start = time.monotonic()
  results = _both(lambda: _fails_then_waits(failing),
                  lambda: waiting.barrier(key='write_complete', timeout_ms=60_000))
  assert time.monotonic() - start < 5  # not the minute the barriers allow
  assert isinstance(results[0], SaveFailedElsewhere)
  assert isinstance(results[1], SaveFailedElsewhere)
  assert 'No space left on device' in str(results[1])
  assert failing.local_error == '[Errno 28] No space left on device'
  assert waiting.local_error == ''
  assert waiting.first_failure() == {'process': 0,
                                     'error': '[Errno 28] No space left on device'}
  # The process released by the failure did not post an error of its own.
  assert [k for k, _ in waiting.failures()] == [f'{waiting.prefix}/failed/0']


def test_a_barrier_key_used_again_waits_for_everyone_again():
  client = FakeClient()
  a, b = _agreement(client, 0), _agreement(client, 1)
  passed_second = []

  def twice_quickly():
    a.barrier(key='set_value', timeout_ms=10_000)
    a.barrier(key='set_value', timeout_ms=10_000)
    passed_second.append(time.monotonic())

  def twice_slowly():
    b.barrier(key='set_value', timeout_ms=10_000)
    time.sleep(0.5)
    arrived = time.monotonic()
    b.barrier(key='set_value', timeout_ms=10_000)
    return arrived
  _, b_arrived = _both(twice_quickly, twice_slowly)
  assert passed_second[0] >= b_arrived  # the second round did not pass on the first's keys


def test_a_barrier_not_everyone_reaches_times_out_naming_its_key():
  alone = _agreement(FakeClient(), 0)
  with pytest.raises(TimeoutError, match='checkpoint barrier write_complete'):
    alone.barrier(key='write_complete', timeout_ms=200)
