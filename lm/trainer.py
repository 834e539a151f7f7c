"""The training loop, split into named pieces: setup, restore-or-init, step, log, save.

`train(config)` is what `scripts/train.py` calls. The loop dispatches step n and only then
reads step n-1's metrics, so the host never waits for the device between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data.pipeline import TrainBatches, eval_batches
from data.tokenizer import Tokenizer, check_vocab, load_or_train
from lm import flops
from lm.checkpoint import Checkpointer
from lm.config import Configs, parse, write_config
from lm.evaluation import evaluate, make_eval_step
from lm.metrics import MetricsWriter
from lm.model import Transformer
from lm.optimizer import make_optimizer, schedule
from lm.sharding import AxisRules, batch_sharding, global_batch, make_mesh
from lm.train_step import TrainState, abstract_state, init_state, jit_train_step, make_train_step

log = logging.getLogger(__name__)


class StopRequest:
  """Set by SIGTERM/SIGINT; the loop finishes its step, saves and returns."""

  def __init__(self) -> None:
    self.requested = False

  def __call__(self, signum, frame) -> None:
    log.warning('signal %d: stopping after this step and saving', signum)
    self.requested = True

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self)


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


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes each id decodes to; ids past the tokenizer's vocabulary score 0."""
  out = np.zeros(vocab_size, np.int64)
  lengths = tokenizer.byte_lengths()
  out[:len(lengths)] = lengths
  return out


def _local_rows(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f'batch_size={batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')
  return batch_size // jax.process_count()


def _init_or_restore(cfgs: Configs, model: Transformer, tx, rules: AxisRules,
                     checkpointer: Checkpointer) -> tuple[TrainState, Any, dict | None, int]:
  run = cfgs.run
  state, shardings = init_state(model, tx, run.seq_len, rules, run.seed)
  latest = checkpointer.latest_step()
  if latest is not None:
    log.info('resuming from %s/%d', checkpointer.directory, latest)
    target = abstract_state(model, tx, run.seq_len, rules)
    restored, data_state = checkpointer.restore(latest, target)
    return restored, shardings, data_state, int(restored.step)
  if run.init_from:
    state = state.replace(params=_params_from(run.init_from, state.params))
  return state, shardings, None, 0


def _params_from(init_from: str, params: Any) -> Any:
  """Parameters of another run (its latest checkpoint) or of one checkpoint folder."""
  path = os.path.abspath(init_from)
  step_dir = os.path.basename(path.rstrip('/'))
  if step_dir.isdigit():
    workdir, step = os.path.dirname(os.path.dirname(path)), int(step_dir)
  else:
    workdir, step = path, None
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'init_from: no checkpoints under {init_from}')
  source = Checkpointer(workdir)
  step = source.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'init_from: no checkpoint found in {init_from}')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  log.info('initialising parameters from %s step %d', init_from, step)
  return source.restore_params(step, abstract)


def build(config: ml_collections.ConfigDict) -> Experiment:
  cfgs = parse(config)
  run = cfgs.run
  if jax.process_index() == 0:
    write_config(config, run.workdir)
  tokenizer = load_or_train(cfgs.data, run.workdir, cfgs.model.vocab_size)
  check_vocab(tokenizer, cfgs.model.vocab_size)
  mesh = make_mesh(cfgs.mesh)
  rules = AxisRules(mesh, cfgs.mesh.rules)
  model = Transformer(cfgs.model, rules)
  lr = schedule(cfgs.optimizer, run.steps)
  tx = make_optimizer(cfgs.optimizer, run.steps)
  checkpointer = Checkpointer(run.workdir, keep=run.keep_checkpoints)
  state, shardings, data_state, start = _init_or_restore(cfgs, model, tx, rules, checkpointer)
  step_fn = make_train_step(model, tx, lr, grad_accum=cfgs.optimizer.grad_accum,
                            z_loss=cfgs.optimizer.z_loss, rules=rules)
  batches = TrainBatches(cfgs.data, tokenizer, _local_rows(run.batch_size), run.seq_len,
                         process_index=jax.process_index(),
                         process_count=jax.process_count(), seed=run.seed)
  if data_state is not None:
    batches.load_state_dict(data_state)
  compiled = jit_train_step(step_fn, shardings, rules, (run.batch_size, run.seq_len + 1))
  return Experiment(cfgs, rules, model, tokenizer, state, shardings, compiled, batches,
                    checkpointer, start)


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


def _eval_record(exp: Experiment, eval_step, held_out: list[np.ndarray], step: int) -> dict:
  result = evaluate(eval_step, exp.state.params, held_out, exp.rules)
  return {'step': step, 'eval_loss': result['loss'], 'eval_perplexity': result['perplexity'],
          'eval_bits_per_byte': result['bits_per_byte']}


def _held_out(exp: Experiment) -> list[np.ndarray]:
  run = exp.cfgs.run
  if not run.eval_batches or not exp.cfgs.data.eval_fraction:
    return []
  return eval_batches(exp.cfgs.data, exp.tokenizer, _local_rows(run.batch_size), run.seq_len,
                      run.eval_batches, process_index=jax.process_index(),
                      process_count=jax.process_count())


def train(config: ml_collections.ConfigDict, *, handle_signals: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config`; returns the last metrics."""
  exp = build(config)
  run = exp.cfgs.run
  stop = StopRequest()
  if handle_signals:
    stop.install()
  writer = MetricsWriter(run.workdir, total_steps=run.steps, start_step=exp.start_step,
                         enabled=jax.process_index() == 0)
  held_out = _held_out(exp)
  eval_step = None
  if held_out:
    eval_step = make_eval_step(exp.model, exp.rules, (run.batch_size, run.seq_len + 1),
                               exp.state_shardings.params,
                               token_byte_lengths(exp.tokenizer, exp.cfgs.model.vocab_size))
  bsharding = batch_sharding(exp.rules, (run.batch_size, run.seq_len + 1))
  throughput = _Throughput(exp.cfgs, exp.start_step)
  log_z = exp.cfgs.optimizer.z_loss > 0
  last: dict[str, Any] = {}
  interval = _Interval()  # metrics summed on the device since the last log line
  pending = None  # (step, summed metrics, count) waiting to be read one step late
  step = exp.start_step
  try:
    while step < run.steps and not stop.requested:
      tokens = global_batch(next(exp.batches), bsharding)
      exp.state, metrics = exp.train_step(exp.state, tokens)
      interval.add(metrics)
      step += 1
      if pending is not None:
        last = _log_train(writer, throughput, *pending, log_z=log_z)
        pending = None
      if step % run.log_every == 0 or step == run.steps:
        pending = (step, *interval.take())
      writer.advance(step)
      if eval_step is not None and run.eval_every and step % run.eval_every == 0:
        with throughput.paused():
          writer.write(_eval_record(exp, eval_step, held_out, step))
      if run.checkpoint_every and step % run.checkpoint_every == 0:
        with throughput.paused():
          exp.checkpointer.save(step, exp.state, exp.batches.state_dict())
    if pending is not None:
      last = _log_train(writer, throughput, *pending, log_z=log_z)
    final_eval_done = run.eval_every and step % run.eval_every == 0
    if eval_step is not None and step == run.steps and not final_eval_done:
      writer.write(_eval_record(exp, eval_step, held_out, step))
    if step > exp.start_step and step not in exp.checkpointer.all_steps():
      exp.checkpointer.save(step, exp.state, exp.batches.state_dict(), force=True)
  finally:
    exp.batches.close()
    exp.checkpointer.wait()
    exp.checkpointer.close()
    writer.close()
  return {'step': step, 'stopped_early': step < run.steps, **last}


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


def _log_train(writer: MetricsWriter, throughput: _Throughput, step: int,
               sums: dict[str, jax.Array], last: dict[str, jax.Array], count: int, *,
               log_z: bool) -> dict[str, Any]:
  """One line per log interval: loss and grad norm averaged over it, lr at its end."""
  sums, last = jax.device_get((sums, last))
  record = {'step': step, 'loss': float(sums['loss']) / count, 'lr': float(last['lr']),
            'grad_norm': float(sums['grad_norm']) / count, **throughput.update(step)}
  if log_z:
    record['z_loss'] = float(sums['z_loss']) / count
  writer.write(record)
  return record
