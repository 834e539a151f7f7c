"""What a run is made of before its first step: the `Experiment` and `build`.

`build(config)` checks the config and the run folder (lm/train/resume.py's preflight),
takes the run's lock, then sets up the tokenizer, mesh, model, optimizer, distillation
teacher, state, data and checkpoints, compiles the step and writes the header the run
prints. lm/train/trainer.py's loop runs what it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from data import TrainBatches
from data.pipeline import examples_summary
from data.tokenizer import Tokenizer, check_vocab, load_or_train
from lm import distributed
from lm.config import Configs, as_dict, parse
from lm.model import flops
from lm.model.transformer import Transformer
from lm.run.checkpoint import Checkpointer
from lm.run.folder import RunFolder
from lm.run.lock import RunLock
from lm.run.log import RunLog
from lm.run.meta import file_sha256, make_metadata
from lm.sharding import AxisRules
from lm.train import resume
from lm.train.distill import load_teacher
from lm.train.step import TrainState, jit_train_step, step_parts


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
          f'data: {source}; tokenizer: {tokenizer}'] + _prepared(data) + [
          f'start: {start.origin}'] + (
              [f'wandb: project {cfgs.wandb.project} (id in {run.workdir}/wandb_id)']
              if cfgs.wandb.project else [])


def _prepared(data: Any) -> list[str]:
  """What scripts/prepare_data.py kept of the files, where they are a prepared corpus."""
  from data.prep.report import header_line

  line = header_line(data.files) if data.source == 'files' else ''
  return [f'prepared: {line}'] if line else []


def _active(model: Any) -> str:
  if not model.moe.enabled:
    return ''
  m = model.moe
  return (f', {flops.active_params(model):,} active per token ({m.experts_per_token} of '
          f'{m.num_experts} experts)')


