"""Orbax checkpoints of the train state, the data position and what they were made with.

RUN/checkpoints/<step>/ holds five items:
  state      params, optimizer state, step and RNG; restored onto any mesh's shardings
  data       the pipeline's JSON state, so a resumed run continues with the very next batch
  interval   JSON: the log interval's running sums, so a resumed run logs as the whole one
  meta       JSON: the model keys, the tokenizer's sha256 and vocabulary size and the whole
             resolved config, so a resume or a fine-tune can refuse an incompatible
             checkpoint before it touches anything
  checksums  JSON: a checksum of every array and JSON item (lm/run/checksums.py), checked on
             every restore, so flipped bits make a checkpoint unreadable, not wrong
Saves are asynchronous; a save that fails in the background is reported by `poll()` at
the next step, as `SaveFailed`; with several processes, on every process at the same
step (lm/run/save_agreement.py). Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it
when every file is written, so a process killed mid-save leaves no step folder that
could pass for a good one; such temporary folders are never listed as steps and are
replaced when that step is saved again. Unreadable checkpoints are moved to
RUN/checkpoints.corrupt/, never deleted.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lm import distributed
from lm.run import checksums, layout
from lm.run.save_agreement import DONE, FAILED, SAVING, SaveAgreement, outcome

log = logging.getLogger(__name__)

# At least two checkpoints are kept, whatever `keep_checkpoints` says, so that a corrupt
# latest one always has a predecessor to fall back to.
MIN_KEEP = 2
_ITEMS = ('state', 'data', 'meta', 'interval', 'checksums')


class SaveFailed(Exception):
  """A checkpoint could not be written; the checkpoints committed before it stand."""


class Restored(NamedTuple):
  """What a checkpoint gives back to a resumed run."""
  state: Any
  data: dict[str, Any]  # The pipeline's position.
  interval: dict[str, Any] | None  # The log interval's sums; None before they were saved.


class CorruptCheckpoint(ValueError):
  """A checkpoint's contents do not match the checksums written with it."""


def first_line(e: BaseException) -> str:
  """`Type: first line of the message`: storage errors can run to hundreds of lines."""
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'


# What a CheckpointManager holds that must be closed when its own close() cannot run (it
# waits on the failed save first). Orbax has no public way to reach them, so they are
# named here, in this one place; tests/test_checkpoint.py fails if an Orbax upgrade
# renames one.
ORBAX_MANAGER_PARTS = ('_checkpointer', '_non_blocking_metadata_store',
                       '_blocking_metadata_store', '_checkpoint_deleter')


def close_manager_parts(manager: ocp.CheckpointManager, directory: str) -> None:
  """Closes each of ORBAX_MANAGER_PARTS that `manager` has; failures are only logged."""
  for part in ORBAX_MANAGER_PARTS:
    closer = getattr(getattr(manager, part, None), 'close', None)
    if closer is None:
      continue
    try:
      closer()
    except Exception as e:  # noqa: BLE001
      log.info('closing %s of %s: %s', part, directory, first_line(e))


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the items this project saves.

  Creating one creates RUN/checkpoints. `read_only` opens no manager at all and never
  writes: for checks made before a run commits to anything, evaluation, and the runs
  that others fine-tune from.
  """

  def __init__(self, workdir: str, *, keep: int = MIN_KEEP,
               metadata: Mapping[str, Any] | None = None, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, layout.CHECKPOINTS)
    self._metadata = dict(metadata) if metadata is not None else None
    self._manager = None
    self._in_flight: int | None = None  # The step being saved in the background.
    self._failed = False
    self._agreement: SaveAgreement | None = None
    self._local_error = ''  # This process's part of the save in flight failed (several).
    if not read_only:
      if jax.process_count() > 1:
        self._agreement = SaveAgreement(ocp.multihost.get_jax_distributed_client(),
                                        jax.process_index(), jax.process_count(),
                                        describe=first_line)
      barrier = self._agreement.barrier if self._agreement else None
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max(keep, MIN_KEEP), create=True, enable_async_checkpointing=True,
          async_options=ocp.AsyncOptions(barrier_sync_fn=barrier))
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=_ITEMS)

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first; temporary (uncommitted) folders are not steps."""
    if self._manager is None:
      return committed_steps(self.workdir)
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           interval: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save; `wait()` blocks until it is committed.

    `interval`: the log interval's running sums (JSON), so that a run resumed from this
    step logs the figures the uninterrupted run logs. Raises SaveFailed if the previous
    save failed (or this one cannot start).
    """
    if self._failed:
      raise SaveFailed(f'an earlier save in {self.directory} failed; not saving step {step}')
    self.wait()  # Orbax would wait for the previous save too; its error is reported as its own.
    self._clear_unfinished(step)
    json_items = {'data': data_state}
    if self._metadata is not None:
      json_items['meta'] = self._metadata
    if interval is not None:
      json_items['interval'] = interval
    sums = checksums.make(state, json_items)  # Before the step donates the state.
    items = {'state': ocp.args.StandardSave(state), 'checksums': ocp.args.JsonSave(sums),
             **{name: ocp.args.JsonSave(value) for name, value in json_items.items()}}
    self._in_flight = step
    try:
      return self._writer().save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001  The previous save's error, or this one's.
      if self._agreement is None:
        raise self._failure(e) from e
      self._local_error = first_line(e)  # Told to the others at the next poll().
      return False

  def poll(self) -> None:
    """Raises SaveFailed once the background save has failed; cheap when none is running.

    With several processes every process must call it once per step: while a save is in
    flight it is a rendezvous of all of them.
    """
    if self._in_flight is None or self._manager is None:
      return
    if self._agreement is not None:
      self._agree(until_done=False)
      return
    if self._manager.is_saving_in_progress():
      return
    try:
      self._manager.wait_until_finished()  # Finished: returns at once, or raises its error.
    except Exception as e:  # noqa: BLE001
      raise self._failure(e) from e
    self._in_flight = None

  def _failure(self, error: BaseException | str) -> SaveFailed:
    step, self._in_flight, self._failed = self._in_flight, None, True
    why = error if isinstance(error, str) else first_line(error)
    return SaveFailed(f'could not save the checkpoint of step {step} in {self.directory}: '
                      f'{why}')

  def _agree(self, *, until_done: bool) -> None:
    """Exchanges the save's status with the other processes (lm/run/save_agreement.py);
    raises the failing process's SaveFailed on every process alike."""
    assert self._agreement is not None
    while True:
      state = self._local_state()
      result, failed = outcome(self._agreement.exchange(state, self._local_error))
      if result == FAILED:
        # The error where the save failed, rather than the others' "failed elsewhere".
        failed = self._agreement.first_failure() or failed
        raise self._failure(f'process {failed["process"]}: {failed["error"]}')
      if result == DONE:
        self._in_flight = None
        return
      if not until_done:
        return
      time.sleep(0.1)

  def _local_state(self) -> str:
    """This process's part of the save in flight: SAVING, DONE or FAILED."""
    self._local_error = self._local_error or self._agreement.local_error
    if self._local_error:
      return FAILED
    if self._manager.is_saving_in_progress():
      return SAVING
    try:
      self._manager.wait_until_finished()  # Finished: returns at once, or raises its error.
    except Exception as e:  # noqa: BLE001
      self._local_error = first_line(e)
      return FAILED
    return DONE

  def _clear_unfinished(self, step: int) -> None:
    """Removes what a killed run left of an unfinished save of `step`.

    A run that resumes from an earlier checkpoint saves `step` again. Orbax would clear
    the stale temporary folder itself, but it does so from several threads at once and
    can fail half-way, losing the save. It is not a checkpoint (never committed), so
    process 0 removes it here, before the new save starts; saves still in flight are
    waited for first, so only a dead run's leftovers can match.
    """
    pattern = os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp*')
    if jax.process_index() == 0 and glob.glob(pattern):
      self.wait()
      for stale in glob.glob(pattern):
        log.warning('removing %s, an unfinished save of step %d', stale, step)
        try:
          shutil.rmtree(stale)
        except OSError as e:  # Orbax tries again; the other processes must not hang.
          log.warning('could not remove %s: %s', stale, e)
    _barrier(f'checkpoint_clear_unfinished_{step}')

  def restore(self, step: int, abstract_state: Any) -> Restored:
    """State, data position and log interval, onto the shardings of `abstract_state`
    (any mesh).

    Raises CorruptCheckpoint when they do not match the checksums saved with them.
    """
    step_dir = self.step_dir(step)
    with ocp.StandardCheckpointer() as reader:
      state = reader.restore(os.path.join(step_dir, 'state'), abstract_state)
    json_items = {'data': _read_json(step_dir, 'data')}
    for item in ('meta', 'interval'):  # Absent from checkpoints written before them.
      if os.path.isdir(os.path.join(step_dir, item)):
        json_items[item] = _read_json(step_dir, item)
    _verify(step_dir, state, json_items)
    return Restored(state, json_items['data'], json_items.get('interval'))

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Just the parameters (fine-tuning, evaluation, export)."""
    return read_params(self.step_dir(step), abstract_params)

  def move_aside(self, step: int) -> str:
    """Renames an unreadable step folder into RUN/checkpoints.corrupt/; returns the path.

    Process 0 renames; every process waits for it and then forgets the step.
    """
    target = os.path.join(self.workdir, layout.CORRUPT, str(step))
    n = 1
    while os.path.exists(target):  # The same step may go bad more than once.
      target = os.path.join(self.workdir, layout.CORRUPT, f'{step}-{n}')
      n += 1
    _barrier(f'checkpoint_move_aside_{step}_named')  # Every process names the same target.
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(self.step_dir(step), target)
    _barrier(f'checkpoint_move_aside_{step}_moved')
    self._writer().reload()
    return target

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises SaveFailed if it failed.

    With several processes, a rendezvous of all of them while a save is in flight.
    """
    if self._manager is None or self._failed:
      return
    if self._agreement is not None:
      if self._in_flight is not None:
        self._agree(until_done=True)
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failure(e) from e
    self._in_flight = None

  def close(self) -> None:
    """Waits for the save in flight, then stops Orbax's threads, even after a failure.

    After a failed save Orbax's own `close` raises the save's error again before it has
    stopped anything, and the process then hangs at exit; so each part is closed here.
    """
    if self._manager is None:
      return
    manager, self._manager = self._manager, None
    if self._failed and self._agreement is not None:
      # Every process gets here, having agreed the save failed. Some of Orbax's threads
      # wait on the coordination service for a process that gave up (a signal its failed
      # write never sent); ending the runtime ends those waits with an error.
      distributed.shutdown()
    if not self._failed:
      try:
        manager.close()
        return
      except Exception as e:  # noqa: BLE001  Reported by wait() already, or now logged.
        log.info('closing %s: %s', self.directory, first_line(e))
    close_manager_parts(manager, self.directory)

  def _writer(self) -> ocp.CheckpointManager:
    if self._manager is None:
      raise ValueError(f'{self.directory} was opened read-only')
    return self._manager


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# Readers: they open nothing for writing.


def committed_steps(workdir: str) -> list[int]:
  """RUN/checkpoints' committed steps, oldest first (temporary folders are skipped)."""
  return sorted(ocp.path.step.checkpoint_steps(os.path.join(workdir, layout.CHECKPOINTS)))


def _read_json(step_dir: str, item: str) -> Any:
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as reader:
    return reader.restore(os.path.join(step_dir, item))


def _verify(step_dir: str, state: Any | None, json_items: dict[str, Any], *,
            under: str = '') -> None:
  """Raises CorruptCheckpoint if what was read differs from the saved checksums.

  `under`: `state` is only this part of the train state (say '.params'), whose saved
  checksums are keyed by paths into the whole TrainState.
  """
  if not os.path.isdir(os.path.join(step_dir, 'checksums')):
    return  # Written before checkpoints carried checksums.
  saved = _read_json(step_dir, 'checksums')
  if under:
    saved = {**saved, 'arrays': {k[len(under):]: v for k, v in saved['arrays'].items()
                                 if k.startswith(under)}}
  bad = checksums.mismatches(saved, state, json_items)
  if bad:
    more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    raise CorruptCheckpoint(f'checksum mismatch in {", ".join(bad[:3])}{more}')


def read_metadata(step_dir: str) -> dict[str, Any] | None:
  """A step's `meta` item; None for a checkpoint written before it existed."""
  if not os.path.isdir(os.path.join(step_dir, 'meta')):
    return None
  meta = _read_json(step_dir, 'meta')
  _verify(step_dir, None, {'meta': meta})
  return meta


def read_params(step_dir: str, abstract_params: Any) -> Any:
  """Just the parameters of a step, onto `abstract_params`' shardings (fine-tuning)."""
  target = {'params': abstract_params}
  args = ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
    # Orbax wants an absolute path; a user's `--workdir=runs/tiny` is relative.
    params = reader.restore(os.path.abspath(os.path.join(step_dir, 'state')),
                            args=args)['params']
  _verify(step_dir, params, {}, under='.params')
  return params
