"""Where a run starts: its own latest good checkpoint, another run's parameters, or init.

`preflight` runs first and only reads: an incompatible checkpoint or a bad `init_from`
stops the run before it writes a single file. `start_state` then restores (moving
unreadable checkpoints aside), fine-tunes from a source, or initialises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from data.tokenizer import Tokenizer
from lm.config import Configs
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from lm.optim.config import OptimizerConfig
from lm.run import checkpoint, meta
from lm.run.checkpoint import Checkpointer, Restored, committed_steps, first_line
from lm.run.folder import RunFolder
from lm.sharding import AxisRules
from lm.train.distill import check_teacher
from lm.train.step import TrainState, abstract_state, init_state, state_from_params

log = logging.getLogger(__name__)

HF_PREFIX = 'hf:'


@dataclasses.dataclass(frozen=True)
class Source:
  """One committed checkpoint of another run, to fine-tune from."""

  workdir: str
  step: int

  @property
  def path(self) -> str:
    return RunFolder(self.workdir).step_dir(self.step)

  @property
  def tokenizer(self) -> str:
    return RunFolder(self.workdir).tokenizer_path


class Plan(NamedTuple):
  """What `preflight` decided: the fine-tuning source (if any) and the tokenizer file."""

  source: Source | None
  tokenizer: str  # data.tokenizer to use: as configured, or the source run's


class Start(NamedTuple):
  state: TrainState
  shardings: Any
  data_state: dict[str, Any] | None  # None: the pipeline starts from the beginning
  step: int
  origin: str  # For the run's header: 'new run', 'resumed from ...', 'initialised from ...'
  interval: dict[str, Any] | None = None  # The log interval's sums at the resumed step


def resolve_init_from(init_from: str, flag: str = 'init_from') -> Source:
  """A run folder (its latest checkpoint) or one checkpoint folder RUN/checkpoints/<step>;
  errors name `flag`, the key that gave the path."""
  path = os.path.abspath(init_from)
  if not os.path.isdir(path):
    raise ValueError(f'{flag}: no such folder: {init_from}')
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == RunFolder.CHECKPOINTS:
    source = Source(os.path.dirname(parent), int(os.path.basename(path)))
    if source.step not in committed_steps(source.workdir):
      raise ValueError(f'{flag}: {init_from} is not a committed checkpoint')
    return source
  steps = committed_steps(path)
  if not steps:
    raise ValueError(f'{flag}: no checkpoint in {init_from} (expected a run folder '
                     'or a checkpoint folder RUN/checkpoints/<step>)')
  return Source(path, steps[-1])


def fingerprint(model: ModelConfig, tokenizer_path: str | None) -> dict[str, Any]:
  """The metadata a checkpoint of this model and tokenizer would carry."""
  if tokenizer_path is None:
    return {'model': dataclasses.asdict(model)}
  return meta.make_metadata(dataclasses.asdict(model),
                                  meta.file_sha256(tokenizer_path),
                                  Tokenizer(tokenizer_path).vocab_size)


def preflight(cfgs: Configs) -> Plan:
  """Refuses an incompatible resume or fine-tune with one line naming what differs.

  Reads only. The run resumes when its own folder has checkpoints (init_from is then
  ignored); otherwise init_from names the source, whose tokenizer the new run uses
  unless data.tokenizer says otherwise.
  """
  run, tokenizer = cfgs.run, cfgs.data.tokenizer
  if tokenizer and not os.path.isfile(tokenizer):
    raise ValueError(f'data.tokenizer: no such file: {tokenizer}')
  own_tokenizer = RunFolder(run.workdir).tokenizer_path
  current = tokenizer or (own_tokenizer if os.path.isfile(own_tokenizer) else None)
  steps = committed_steps(run.workdir)
  check_teacher(cfgs, current)
  if steps:
    _refuse_pruned(run.workdir, steps)
    _check(run.workdir, steps, cfgs.model, current,
           'use a new workdir, or fine-tune from it with init_from', cfgs.optimizer)
    return Plan(None, tokenizer)
  if not run.init_from or run.init_from.startswith(HF_PREFIX):
    return Plan(None, tokenizer)
  source = resolve_init_from(run.init_from)
  if current is None and os.path.isfile(source.tokenizer):
    current = tokenizer = source.tokenizer
  _check(source.workdir, [source.step], cfgs.model, current,
         f'init_from={run.init_from} needs the same model and tokenizer',
         free=meta.POSITION_MODEL_KEYS)
  return Plan(source, tokenizer)


def _refuse_pruned(workdir: str, steps: list[int]) -> None:
  """A pruned run (scripts/prune.py) holds no optimizer state to resume, and plain
  training would grow its pruned weights back: say so before anything moves."""
  saved, step_dir = _newest_metadata(workdir, steps)
  if saved and saved.get('pruned'):
    raise ValueError(f'{step_dir} holds pruned weights (scripts/prune.py), not a run to '
                     'resume; fine-tune them in a new workdir with '
                     f'--config.init_from={workdir}')


def _check(workdir: str, steps: list[int], model: ModelConfig, tokenizer_path: str | None,
           hint: str, optimizer: OptimizerConfig | None = None,
           free: frozenset[str] = frozenset()) -> None:
  """One line: the checkpoint, each key that differs, what to do about it. `optimizer`
  (a resume, which restores the optimizer state): the optimizer.name and hold_zeros it
  must have had.
  `free`: model keys that may differ (a fine-tune's RoPE, lm/run/checkpoint.py)."""
  saved, step_dir = _newest_metadata(workdir, steps)
  if saved is None:
    return  # Written before checkpoints carried metadata: nothing to compare.
  if tokenizer_path is None and saved.get('tokenizer'):
    raise ValueError(f'{step_dir} was trained with a tokenizer, but '
                     f'{RunFolder(workdir).tokenizer_path} is missing and data.tokenizer is '
                     'empty')
  diffs = meta.incompatibilities(with_default_model_keys(saved),
                                       fingerprint(model, tokenizer_path), free)
  # The optimizer state of one optimizer cannot be restored as another's. Checkpoints
  # from before optimizer.name existed are AdamW's.
  # Nor one with hold_zeros' masks as one without.
  before = (saved.get('config') or {}).get('optimizer', {})
  shape = {'name': before.get('name', 'adamw'), 'hold_zeros': before.get('hold_zeros', False)}
  for key, was in shape.items():
    now = getattr(optimizer, key) if optimizer is not None else was
    if now != was:
      diffs.append(f'optimizer.{key}: {json.dumps(was)} in checkpoint, {json.dumps(now)} now')
  if diffs:
    raise ValueError(f'{step_dir} does not match this config: {"; ".join(diffs)} ({hint})')


def with_default_model_keys(saved: dict[str, Any]) -> dict[str, Any]:
  """A checkpoint's metadata with each model key it predates at that key's default.

  A new model key's default is the model as it was before the key, so an older
  checkpoint was trained with it: turning on a switch that adds no parameter (a logit
  soft-cap) is then refused on resume like any other change, not passed over.
  """
  if saved.get('model') is None:
    return saved
  return {**saved, 'model': {**dataclasses.asdict(ModelConfig()), **saved['model']}}


def _newest_metadata(workdir: str, steps: list[int]) -> tuple[dict[str, Any] | None, str]:
  for step in sorted(steps, reverse=True):
    step_dir = RunFolder(workdir).step_dir(step)
    try:
      return checkpoint.read_metadata(step_dir), step_dir
    except Exception as e:  # noqa: BLE001  Any failure to read means unreadable.
      # start_state moves it aside; judge by the one before.
      log.info('cannot read the metadata of %s: %s', step_dir, first_line(e))
  return None, ''


def start_state(cfgs: Configs, model: Transformer, tx: optax.GradientTransformation,
                rules: AxisRules, checkpointer: Checkpointer, source: Source | None) -> Start:
  """The run's latest readable checkpoint, else init_from's parameters, else a fresh init."""
  run = cfgs.run
  abstract = abstract_state(model, tx, run.seq_len, rules)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  restored = restore_latest(checkpointer, abstract)
  if restored is not None:
    step, saved = restored
    return Start(saved.state, shardings, saved.data, step,
                 f'resumed from step {step} ({checkpointer.step_dir(step)})', saved.interval)
  if source is not None:
    params = _source_params(source, abstract.params)
    origin = source.path
  elif run.init_from.startswith(HF_PREFIX):
    params = _hf_params(run.init_from[len(HF_PREFIX):], cfgs.model, abstract.params)
    origin = run.init_from
  else:
    state, shardings = init_state(model, tx, run.seq_len, rules, run.seed)
    return Start(state, shardings, None, 0, 'new run')
  # Fine-tuning: the parameters only; a fresh optimizer, step 0, this run's seed.
  return Start(state_from_params(params, tx, run.seed, shardings), shardings, None, 0,
               f'initialised from {origin} (parameters only: new optimizer, step 0)')


def restore_latest(checkpointer: Checkpointer, abstract: Any) -> tuple[int, Restored] | None:
  """Restores the newest readable checkpoint; unreadable ones are moved aside, with a warning.

  Newest first, so a healthy run pays for one restore. With several processes, all must
  have read the step, or all move on to the one before together.
  """
  moved = []
  for step in reversed(checkpointer.all_steps()):
    try:
      restored = checkpointer.restore(step, abstract)
      error = None
    except Exception as e:  # noqa: BLE001  Truncated or missing files, bad JSON, ...
      error = e
    if _everywhere(error is None):
      return step, restored
    path = checkpointer.step_dir(step)
    moved.append(checkpointer.move_aside(step))
    log.warning('checkpoint %s is unreadable (%s); moved it to %s and falling back to the '
                'one before', path, first_line(error) if error else 'on another process',
                moved[-1])
  if moved:
    raise ValueError(f'no readable checkpoint in {checkpointer.directory}; moved '
                     f'{", ".join(moved)} aside (run again to start from scratch)')
  return None


def _everywhere(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _source_params(source: Source, abstract_params: Any) -> Any:
  log.info('initialising parameters from %s', source.path)
  try:
    return RunFolder(source.workdir).restore_params(source.step, abstract_params)
  except ValueError as e:  # One line naming the folder, as eval.py's.
    raise ValueError(f'init_from: {e}') from e


def _hf_params(path: str, model_cfg: ModelConfig, abstract_params: Any) -> Any:
  """Parameters converted from a Hugging Face Llama folder, placed on this run's mesh."""
  from lm.export import hf_import  # Imported only when asked for: it pulls in the conversion code.
  return hf_import.load_hf(path, model_cfg, like=abstract_params)
