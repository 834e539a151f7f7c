"""The training loop, split into named pieces: setup, restore-or-init, step, log, save.

`train(config)` is what `scripts/train.py` calls. The loop dispatches step n and only then
reads step n-1's metrics, so the host never waits for the device between steps. Where
the run starts (resume, fine-tune, init) is `lm/train/resume.py`'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import TrainBatches
from data.pipeline import examples_summary
from data.tokenizer import Tokenizer, check_vocab, load_or_train
from lm import distributed
from lm.config import Configs, as_dict, parse
from lm.eval.perplexity import (
  ScoredBatch,
  evaluate,
  heldout_rows,
  make_eval_step,
  token_byte_lengths,
)
from lm.model import flops, moe
from lm.model.transformer import Transformer
from lm.run.checkpoint import Checkpointer, SaveFailed, file_sha256, make_metadata
from lm.run.folder import RunFolder
from lm.run.lock import RunLock
from lm.run.log import RunLog
from lm.run.metrics import MetricsWriter
from lm.run.wandb_tracker import WandbWriter
from lm.sharding import AxisRules, put_rows
from lm.train import resume
from lm.train.distill import load_teacher
from lm.train.step import TrainState, jit_train_step, step_parts
from lm.train.stops import NonFiniteGuard, StopRequest, TrainingAborted

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
  """Everything the loop needs, built once from the config."""

  cfgs: Configs
  rules: AxisRules
  model: Transformer
  tokenizer: Tokenizer
  state: TrainState
  state_shardings: Any
  train_step: Any
  batches: TrainBatches
  checkpointer: Checkpointer
  start_step: int
  header: list[str]
  start_interval: dict[str, Any] | None  # The log interval's sums the checkpoint carried
  # What `build` took, released in reverse: the lock, the run log, Orbax's threads, the
  # data threads.
  resources: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

  def close(self) -> None:
    """Releases what `build` took. Safe to call more than once."""
    self.resources.close()


def is_main_process() -> bool:
  return jax.process_index() == 0


def _data_state(batches: TrainBatches) -> dict[str, Any]:
  """The pipeline's global state: each process's streams, merged (same on every host)."""
  states = distributed.gather_json(batches.state_dict())
  return states[0] if len(states) == 1 else TrainBatches.merge_states(states)


def _local_rows(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f'batch_size={batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  return batch_size // jax.process_count()


def build(config: ml_collections.ConfigDict) -> Experiment:
  """Checks, then sets up: tokenizer, mesh, model, optimizer, state, data, checkpoints.

  Nothing in the run folder changes until every check has passed, save the lock, a
  tokenizer a new run trains, and unreadable checkpoints moved aside: config.json is
  written last, so a refused resume leaves the run's settings as they were.
  """
  cfgs = parse(config)
  plan = resume.preflight(cfgs)  # Reads only: a refused resume leaves no trace.
  if plan.tokenizer != cfgs.data.tokenizer:  # config.json then records the choice.
    cfgs = cfgs._replace(data=dataclasses.replace(cfgs.data, tokenizer=plan.tokenizer))
  run = cfgs.run
  rules = AxisRules.from_config(cfgs.mesh)  # A bad mesh, too, writes nothing.
  with contextlib.ExitStack() as stack:  # Released in reverse if anything below fails.
    lock = RunLock(run.workdir)
    lock.acquire()
    stack.callback(lock.release)
    stack.callback(RunLog(run.workdir).close)
    exp = _build_locked(cfgs, plan, rules, stack)
    exp.resources = stack.pop_all()  # Built: the Experiment releases them from now on.
  return exp


def _build_locked(cfgs: Configs, plan: resume.Plan, rules: AxisRules,
                  stack: contextlib.ExitStack) -> Experiment:
  run = cfgs.run
  tokenizer_origin = describe_tokenizer(cfgs.data, run.workdir)
  run_tokenizer = RunFolder(run.workdir).tokenizer_path
  # Process 0 trains or copies the tokenizer into the run folder; the others then read it.
  if jax.process_index() == 0:
    load_or_train(cfgs.data, run_tokenizer, cfgs.model.vocab_size)
  distributed.barrier('tokenizer')
  tokenizer = load_or_train(cfgs.data, run_tokenizer, cfgs.model.vocab_size)
  check_vocab(tokenizer, cfgs.model.vocab_size)
  # Read before anything is written, so a bad record stops the run with nothing changed;
  # by every process, so that all of them stop.
  examples_line = examples_summary(cfgs.data, tokenizer, run.seq_len)

  teacher = load_teacher(cfgs, rules, tokenizer.path)
  parts = step_parts(cfgs, rules, teacher.model if teacher else None)
  model, tx = parts.model, parts.tx
  metadata = make_metadata(dataclasses.asdict(cfgs.model), file_sha256(tokenizer.path),
                           tokenizer.vocab_size, as_dict(cfgs))
  checkpointer = Checkpointer(run.workdir, keep=run.keep_checkpoints, metadata=metadata)
  stack.callback(checkpointer.close)  # Never raises: an error in flight is the one to see.
  start = resume.start_state(cfgs, model, tx, rules, checkpointer, plan.source)
  batches = TrainBatches(cfgs.data, tokenizer, _local_rows(run.batch_size), run.seq_len,
                         process_index=jax.process_index(),
                         process_count=jax.process_count(), seed=run.seed)
  stack.callback(batches.close)
  if start.data_state is not None:
    batches.load_state_dict(start.data_state)
  if jax.process_index() == 0:
    RunFolder(run.workdir).write_config(cfgs)
  compiled = jit_train_step(parts.step_fn, start.shardings, rules,
                            (run.batch_size, run.seq_len + 1),
                            None if teacher is None else
                            jax.tree.map(lambda x: x.sharding, teacher.params))
  if teacher is not None:  # The teacher's parameters: an argument, never in the state.
    compiled = functools.partial(_with_teacher, compiled, teacher.params)
  header = run_header(cfgs, rules, start, tokenizer_origin,
                      flops.count_params(start.state.params))
  if examples_line:
    header.insert(-1, f'fine-tuning on responses only: {examples_line}')
  if teacher is not None:
    d = cfgs.distill
    header.insert(-1, f'distilling from {teacher.workdir} (step {teacher.step}, '
                      f'{flops.count_params(teacher.params):,} parameters): {d.ce_weight} x '
                      f'loss + {d.kl_weight} x T^2 x KL at T={d.temperature}')
  return Experiment(cfgs, rules, model, tokenizer, start.state, start.shardings, compiled,
                    batches, checkpointer, start.step, header, start.interval)


def _with_teacher(compiled: Any, teacher_params: Any, state: Any, batch: Any) -> Any:
  return compiled(state, batch, teacher_params)


def describe_tokenizer(data_cfg: Any, workdir: str) -> str:
  """Where the run's tokenizer comes from, said before it is loaded or trained."""
  own = RunFolder(workdir).tokenizer_path
  if data_cfg.tokenizer:
    return f'{data_cfg.tokenizer} (copied to {own})' if not os.path.isfile(own) else own
  if os.path.isfile(own):
    return own
  return f'trained now on the training split, saved as {own}'


def run_header(cfgs: Configs, rules: AxisRules, start: resume.Start, tokenizer: str,
               n_params: int) -> list[str]:
  """What the run is about to do, printed once before the first step."""
  run, data = cfgs.run, cfgs.data
  mesh = ' x '.join(f'{name}={size}' for name, size in rules.mesh.shape.items())
  source = {'stdlib': 'the embedded corpus (Python standard library sources)',
            'files': f'files {data.files}'}.get(data.source, f'dataset {data.name}')
  return [f'run folder: {os.path.abspath(run.workdir)}',
          f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} in '
          f'{jax.process_count()} process(es); mesh {mesh}',
          f'model: {n_params:,} parameters{_active(cfgs.model)}; '
          f'{run.batch_size * run.seq_len:,} tokens per step '
          f'({run.batch_size} x {run.seq_len}), {run.steps} steps',
          f'data: {source}; tokenizer: {tokenizer}',
          f'start: {start.origin}'] + (
              [f'wandb: project {cfgs.wandb.project} (id in {run.workdir}/wandb_id)']
              if cfgs.wandb.project else [])


def _active(model: Any) -> str:
  if not model.moe.enabled:
    return ''
  m = model.moe
  return (f', {flops.active_params(model):,} active per token ({m.experts_per_token} of '
          f'{m.num_experts} experts)')


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
    except (TrainingAborted, SaveFailed):
      self._write_pending()  # The metrics up to the stop, for the post-mortem.
      raise
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
