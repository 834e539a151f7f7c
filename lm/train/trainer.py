"""The training loop, split into named pieces: step, log, evaluate, save, finish.

`train(config)` is what `scripts/train.py` calls. The loop dispatches step n and only then
reads step n-1's metrics, so the host never waits for the device between steps. What it
runs is built by lm/train/experiment.py; where the run starts (resume, fine-tune, init)
is lm/train/resume.py's business.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import TrainBatches
from lm import distributed
from lm.config import Configs, as_dict
from lm.eval.perplexity import (
  ScoredBatch,
  evaluate,
  heldout_rows,
  make_eval_step,
  token_byte_lengths,
)
from lm.model import flops, moe
from lm.run.checkpoint import SaveFailed
from lm.run.metrics import MetricsWriter
from lm.run.wandb_tracker import WandbWriter
from lm.sharding import put_rows
from lm.train.experiment import Experiment, build
from lm.train.stops import NonFiniteGuard, StopRequest, TrainingAborted

log = logging.getLogger(__name__)


def is_main_process() -> bool:
  return jax.process_index() == 0


def _data_state(batches: TrainBatches) -> dict[str, Any]:
  """The pipeline's global state: each process's streams, merged (same on every host)."""
  states = distributed.gather_json(batches.state_dict())
  return states[0] if len(states) == 1 else TrainBatches.merge_states(states)


class _Throughput:
  """Tokens/s and MFU over the training time between two metric reads."""

  def __init__(self, cfgs: Configs, start_step: int):
    self.tokens_per_step = cfgs.run.batch_size * cfgs.run.seq_len
    self.cfgs = cfgs
    self.peak = flops.device_peak_flops()
    self.last_step, self.last_time = start_step, time.perf_counter()

  @contextlib.contextmanager
  def paused(self):
    """Time spent evaluating or saving does not count against training throughput."""
    t = time.perf_counter()
    yield
    self.last_time += time.perf_counter() - t

  def update(self, step: int) -> dict[str, float | None]:
    now = time.perf_counter()
    tps = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {'tokens_per_sec': tps,
            'mfu': flops.mfu(tps, self.cfgs.model, self.cfgs.run.seq_len,
                             jax.device_count(), self.peak)}


def _held_out(exp: Experiment) -> list[ScoredBatch]:
  run = exp.cfgs.run
  if not run.eval_batches or not exp.cfgs.data.eval_fraction:
    return []
  return heldout_rows(exp.cfgs.data, exp.tokenizer, run.batch_size, run.seq_len,
                      run.eval_batches)


def train(config: ml_collections.ConfigDict, *, handle_signals: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config`; returns the last metrics.

  handle_signals: stop cleanly on SIGTERM / SIGINT (off for in-process callers such as
  tests that keep their own handlers). The previous handlers are restored on return.
  """
  stop = StopRequest(multiprocess=jax.process_count() > 1)
  if handle_signals:
    stop.install()  # Before build, so a signal during compilation also stops cleanly.
  try:
    exp = build(config)
    try:
      return _Loop(exp, stop if handle_signals else StopRequest()).run()
    finally:
      exp.close()
  finally:
    stop.uninstall()


class _Loop:
  """The step loop, split into named pieces: step, log, evaluate, save, finish."""

  def __init__(self, exp: Experiment, stop: StopRequest) -> None:
    self.exp, self.stop, self.run_cfg = exp, stop, exp.cfgs.run
    run = self.run_cfg
    self.held_out = _held_out(exp)
    self.eval_step = None
    if self.held_out:
      self.eval_step = make_eval_step(
          exp.model, exp.rules, (run.batch_size, run.seq_len + 1), exp.state_shardings.params,
          token_byte_lengths(exp.tokenizer, exp.cfgs.model.vocab_size),
          loss_chunk=exp.cfgs.loss.chunk)
    self.throughput = _Throughput(exp.cfgs, exp.start_step)
    # Metrics summed on the device since the last log line; a resume goes on from the
    # checkpoint's sums, so the line that closes the interval is the uninterrupted run's.
    self.interval = _Interval.from_state(exp.start_interval)
    self.pending = None  # (step, sums, last, count) waiting to be read one step late
    self.guard = NonFiniteGuard(run.max_nonfinite_steps)
    self.step = exp.start_step
    self.last: dict[str, Any] = {}
    main = jax.process_index() == 0
    mirrors = [WandbWriter(exp.cfgs.wandb, run.workdir, as_dict(exp.cfgs))] if (
        main and exp.cfgs.wandb.project) else []
    self.writer = MetricsWriter(run.workdir, total_steps=run.steps, start_step=exp.start_step,
                                enabled=main, mirrors=mirrors)

  def run(self) -> dict[str, Any]:
    run = self.run_cfg
    try:
      self.writer.header(self.exp.header)
      while self.step < run.steps and not self.stop.should_stop(self.step):
        self._train_step()
        if self.eval_step is not None and run.eval_every and self.step % run.eval_every == 0:
          self._evaluate()
        if run.checkpoint_every and self.step % run.checkpoint_every == 0:
          self._save(final=False)
      self._finish()
      self.exp.checkpointer.wait()  # The last save is committed, or SaveFailed says why not.
    except TrainingAborted:
      self._write_pending()  # The metrics up to the stop, for the post-mortem.
      raise
    except SaveFailed as e:
      self._write_pending()
      # Every process stops at this step (lm/run/save_agreement.py): the last logged one.
      raise SaveFailed(f'{e}; stopped after step {self.step}') from e
    finally:
      self.writer.close()
    return {'step': self.step, 'stopped_early': self.step < run.steps, **self.last}

  def _train_step(self) -> None:
    """Dispatches one step, then reads the previous step's metrics (never this one's)."""
    exp = self.exp
    batch = put_rows(next(exp.batches), exp.rules)
    exp.state, metrics = exp.train_step(exp.state, batch)
    self.interval.add(metrics)
    self.step += 1
    self.guard.push(self.step, metrics['nonfinite'])
    self._write_pending()
    exp.checkpointer.poll()  # A background save that failed stops the run here.
    if self.step % self.run_cfg.log_every == 0 or self.step == self.run_cfg.steps:
      self.pending = (self.step, *self.interval.take())
    self.writer.advance(self.step)

  def _write_pending(self) -> None:
    if self.pending is not None:
      self.last = _log_train(self.writer, self.throughput, *self.pending,
                             log_z=self.exp.cfgs.optimizer.z_loss > 0,
                             moe_layers=moe.moe_layers(self.exp.cfgs.model))
      self.pending = None

  def _evaluate(self) -> None:
    exp = self.exp
    with self.throughput.paused():
      result = evaluate(self.eval_step, exp.state.params, self.held_out, exp.rules)
      self.writer.write({'step': self.step, 'eval_loss': result['loss'],
                         'eval_perplexity': result['perplexity'],
                         'eval_bits_per_byte': result['bits_per_byte']})

  def _save(self, *, final: bool) -> None:
    """An asynchronous save; none while the latest steps were skipped as non-finite."""
    self.guard.flush()  # The save waits for this step anyway; may abort instead.
    if self.guard.in_a_row:
      log.warning('step %d: not saving during %d non-finite steps in a row', self.step,
                  self.guard.in_a_row)
      return
    exp = self.exp
    self._write_pending()  # The metrics up to a checkpoint are on disk before it is.
    with self.throughput.paused():
      exp.checkpointer.save(self.step, exp.state, _data_state(exp.batches),
                            interval=self.interval.state_dict(), force=final)

  def _finish(self) -> None:
    """Last log line, final evaluation, and a save unless this step is saved already."""
    self._write_pending()
    run = self.run_cfg
    evaluated = ((run.eval_every and self.step % run.eval_every == 0)
                 or self.writer.has(self.step, 'eval_loss'))  # e.g. a finished run re-run
    if self.eval_step is not None and self.step == run.steps and not evaluated:
      self._evaluate()
    if self.step > self.exp.start_step and self.step not in self.exp.checkpointer.all_steps():
      self._save(final=True)


class _Interval:
  """Sums step metrics on the device (no host sync) until a log line takes them."""

  def __init__(self) -> None:
    self.sums, self.last, self.count = None, None, 0

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.last = metrics
    self.count += 1

  def take(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array], int]:
    out = (self.sums, self.last, self.count)
    self.sums, self.last, self.count = None, None, 0
    return out

  def state_dict(self) -> dict[str, Any]:
    """The sums as JSON: {"count", "sums": {name: [value, dtype]}} (exact: a float32 is
    a Python float without loss)."""
    sums = jax.device_get(self.sums) or {}
    return {'count': self.count,
            'sums': {k: [np.asarray(v).tolist(), str(np.asarray(v).dtype)]
                     for k, v in sums.items()}}

  @classmethod
  def from_state(cls, state: dict[str, Any] | None) -> _Interval:
    interval = cls()
    if state and state['count']:
      interval.sums = {k: jnp.asarray(v, dtype) for k, (v, dtype) in state['sums'].items()}
      interval.count = state['count']
    return interval


def _log_train(writer: MetricsWriter, throughput: _Throughput, step: int,
               sums: dict[str, jax.Array], last: dict[str, jax.Array], count: int, *,
               log_z: bool, moe_layers: tuple[int, ...] = ()) -> dict[str, Any]:
  """One line per log interval: loss and grad norm averaged over the steps not skipped."""
  sums, last = jax.device_get((sums, last))
  skipped = int(sums['nonfinite'])
  good = count - skipped
  mean = lambda key: float(sums[key]) / good if good else None
  record = {'step': step, 'loss': mean('loss'), 'lr': float(last['lr']),
            'grad_norm': mean('grad_norm'), **throughput.update(step),
            'skipped_steps': skipped}
  if log_z:
    record['z_loss'] = mean('z_loss')
  if 'distill_kl' in sums:  # Distilling (lm/train/distill.py): the teacher's term.
    record['distill_kl'] = mean('distill_kl')
  if moe_layers:
    record.update(moe_balance=mean('moe_balance'), moe_router_z=mean('moe_router_z'),
                  moe_dropped=mean('moe_dropped'),
                  **moe.load_summary(sums['moe_load'], moe_layers))
  writer.write(record)
  return record
