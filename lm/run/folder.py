"""The run folder: its layout (`RunFolder`) and reading it back for evaluation, sampling
and export: config, tokenizer, a checkpoint's parameters.

Errors are ValueErrors naming the missing path or step, for the scripts to print.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from data.tokenizer import Tokenizer, check_vocab
from lm.config import Configs, as_dict, parse
from lm.model.params import abstract_params
from lm.model.transformer import Transformer
from lm.run import layout
from lm.run.checkpoint import (
    committed_steps,
    first_line,
    read_metadata,
    read_params,
)
from lm.run.meta import file_sha256
from lm.sharding import AxisRules

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """A trained run, its parameters restored onto `rules.mesh`."""

  workdir: str
  cfgs: Configs
  tokenizer: Tokenizer
  rules: AxisRules
  model: Transformer
  params: Any
  step: int
  # lm/eval/quantize.py's QuantConfig when the weights were quantised after the restore.
  quant: Any = None


class RunFolder:
  """A run folder's layout and how to read it back; every path and error text is here.

  RUN/config.json          the config of the run's latest start
  RUN/tokenizer.model      the tokenizer the run uses
  RUN/checkpoints/<step>/  committed checkpoints (lm/run/checkpoint.py), each with its config
  RUN/checkpoints.corrupt/ unreadable checkpoints, moved aside (never deleted)
  RUN/metrics.jsonl        metric records; RUN/tb/ the same for TensorBoard (metrics.py)
  RUN/train.log            library warnings and errors in full (log.py)
  RUN/.lock                held while a trainer runs here (lock.py)
  RUN/wandb_id             the W&B run a resumed run continues (wandb_tracker.py)
  The names themselves are lm/run/layout.py's.
  """

  CONFIG, TOKENIZER, CHECKPOINTS = layout.CONFIG, layout.TOKENIZER, layout.CHECKPOINTS

  def __init__(self, workdir: str) -> None:
    self.workdir = workdir

  @property
  def config_path(self) -> str:
    return os.path.join(self.workdir, self.CONFIG)

  @property
  def tokenizer_path(self) -> str:
    return os.path.join(self.workdir, self.TOKENIZER)

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.workdir, self.CHECKPOINTS)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.checkpoints, str(step))

  def config(self) -> Configs:
    """RUN/config.json, validated as training validated it."""
    if not os.path.isdir(self.workdir):
      raise ValueError(f'no run folder at {self.workdir}')
    if not os.path.isfile(self.config_path):
      raise ValueError(f'no config.json in {self.workdir}: not a run folder')
    try:
      with open(self.config_path, encoding='utf-8') as f:
        saved = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{self.config_path}: not a JSON file ({e})') from None
    try:
      return parse(saved)
    except ValueError as e:  # Say which file holds the bad key.
      raise ValueError(f'{self.config_path}: {e}') from None

  def write_config(self, cfgs: Configs) -> None:
    """RUN/config.json: the resolved config, every key, as the run used it."""
    os.makedirs(self.workdir, exist_ok=True)
    with open(self.config_path, 'w', encoding='utf-8') as f:
      json.dump(as_dict(cfgs), f, indent=2, sort_keys=True)
      f.write('\n')

  def tokenizer(self) -> Tokenizer:
    if not os.path.isfile(self.tokenizer_path):
      raise ValueError(f'no tokenizer.model in {self.workdir}')
    return Tokenizer(self.tokenizer_path)

  def steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first (none if there is no checkpoints folder)."""
    return committed_steps(self.workdir) if os.path.isdir(self.checkpoints) else []

  def pick_step(self, step: int | None = None) -> int:
    """`step` if it was saved, else the latest; one error text when there is none."""
    steps = self.steps()
    if not steps:
      raise ValueError(f'no checkpoints in {self.checkpoints}')
    if step is None:
      return steps[-1]
    if step not in steps:
      raise ValueError(f'no checkpoint for step {step} in {self.checkpoints} '
                       f'(steps: {", ".join(map(str, steps))})')
    return step

  def checkpoint_config(self, step: int) -> Configs:
    """The config checkpoint `step` was trained with (config.json for older ones), once
    RUN/tokenizer.model is checked to be the tokenizer it was trained with.

    config.json holds the latest start's settings; a checkpoint holds its own, so
    evaluation holds out the very documents that checkpoint's training did.
    """
    try:
      meta = read_metadata(self.step_dir(step))
    except Exception as e:  # noqa: BLE001  Unreadable: say which checkpoint.
      raise ValueError(f'cannot read the checkpoint {self.step_dir(step)}: '
                       f'{first_line(e)}') from e
    self._check_tokenizer(step, meta)
    if not meta or not meta.get('config'):
      return self.config()
    return parse(ml_collections.ConfigDict(meta['config']))

  def _check_tokenizer(self, step: int, meta: dict[str, Any] | None) -> None:
    # Another tokenizer.model maps the same ids to other text: every figure would be
    # wrong without a sign. Checkpoints before the metadata carry no hash to compare.
    saved = ((meta or {}).get('tokenizer') or {}).get('sha256')
    if not saved or not os.path.isfile(self.tokenizer_path):
      return
    now = file_sha256(self.tokenizer_path)
    if now != saved:
      raise ValueError(f'{self.tokenizer_path} (sha256 {now[:16]}) is not the tokenizer '
                       f'{self.step_dir(step)} was trained with (sha256 {saved[:16]}); '
                       'put that one back')

  def restore_params(self, step: int, abstract: Any) -> Any:
    """The parameters of checkpoint `step` onto `abstract`'s shardings; never writes."""
    try:
      return read_params(self.step_dir(step), abstract)
    except Exception as e:  # noqa: BLE001  A corrupt or truncated checkpoint: one line.
      raise ValueError(f'cannot read the parameters in {self.step_dir(step)}: '
                       f'{first_line(e)}') from e


def eval_mesh_rules(cfgs: Configs) -> AxisRules:
  """The run's mesh on the devices present; all data-parallel if its sizes do not fit."""
  try:
    return AxisRules.from_config(cfgs.mesh)
  except ValueError as e:
    log.warning('%s; evaluating with a data-parallel mesh instead', e)
    return AxisRules.from_config(dataclasses.replace(cfgs.mesh, data=-1, fsdp=1, tensor=1))


def load_run(workdir: str, step: int | None = None,
             check_model: Callable[[Transformer], None] | None = None) -> Run:
  """Config, tokenizer and the parameters of checkpoint `step` (default: the latest).

  The parameters land on the run's mesh (`eval_mesh_rules`), sharded as in training.
  `check_model` sees the model before the (slower) restore, to refuse early.
  """
  folder = RunFolder(workdir)
  folder.config()  # Says clearly when `workdir` is not a run folder.
  step = folder.pick_step(step)
  cfgs = folder.checkpoint_config(step)
  tokenizer = folder.tokenizer()
  check_vocab(tokenizer, cfgs.model.vocab_size)
  rules = eval_mesh_rules(cfgs)
  model = Transformer(cfgs.model, rules)
  if check_model is not None:
    check_model(model)
  params = folder.restore_params(step, abstract_params(model, rules))
  return Run(workdir, cfgs, tokenizer, rules, model, params, step)
