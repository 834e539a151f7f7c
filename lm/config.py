"""Turns the ml-collections ConfigDict at the edge into small typed configs.

Each part of the library receives only its own dataclass; nothing below the entry
points sees the whole ConfigDict.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from data.config import DataConfig
from lm.mesh import MeshConfig
from lm.model.config import LossConfig, ModelConfig
from lm.optim.config import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The top-level keys: how long to train, how often to log, evaluate and save."""

  name: str = 'base'
  """Shown in logs; the default workdir is runs/<name>."""
  workdir: str = 'runs/base'
  """The run folder: config, tokenizer, metrics, checkpoints, TensorBoard (docs/runs.md)."""
  seed: int = 0
  """Seeds parameter init, dropout and the data order."""
  steps: int = 1000
  """Optimizer steps to train for."""
  batch_size: int = 8
  """The global batch, in sequences (summed over all hosts and devices)."""
  seq_len: int = 128
  """Tokens per sequence fed to the model."""
  log_every: int = 10
  """Steps between metric lines on stdout and in metrics.jsonl."""
  eval_every: int = 0
  """Steps between held-out evaluations; 0 = only at the end."""
  eval_batches: int = 4
  """Held-out batches per evaluation."""
  checkpoint_every: int = 500
  """Steps between checkpoints (one is always written at the end)."""
  keep_checkpoints: int = 2
  """Recent checkpoints kept; at least 2, so a corrupt one has a fallback."""
  init_from: str = ''
  """Fine-tune from: a run folder, RUN/checkpoints/<step>, or hf:PATH; empty = none."""
  max_nonfinite_steps: int = 10
  """Abort after this many NaN/inf (skipped) steps in a row; 0 = never."""

  def __post_init__(self) -> None:
    for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'keep_checkpoints'):
      if getattr(self, key) <= 0:
        raise ValueError(f'{key}: must be positive (got {getattr(self, key)!r})')
    for key in ('eval_every', 'eval_batches', 'checkpoint_every', 'max_nonfinite_steps'):
      if getattr(self, key) < 0:
        raise ValueError(f'{key}: must be >= 0 (got {getattr(self, key)!r})')


WANDB_MODES = ('', 'online', 'offline', 'disabled')


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """The `wandb.*` keys: the optional W&B mirror of the metrics (lm/run/wandb_tracker.py;
  pip install 'lm[wandb]')."""

  project: str = ''
  """The W&B project; '' = no W&B logging."""
  entity: str = ''
  """Team or user; '' = the logged-in user's default."""
  name: str = ''
  """Display name; '' = the run folder's name."""
  mode: str = ''
  """'online' | 'offline' | 'disabled'; '' = WANDB_MODE, else online."""

  def __post_init__(self) -> None:
    if self.mode not in WANDB_MODES:
      raise ValueError(f'wandb.mode: expected one of {", ".join(WANDB_MODES[1:])} or empty '
                       f'(got {self.mode!r})')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The `distill.*` keys: knowledge distillation from a teacher run (lm/train/distill.py),
  e.g. the unpruned model a pruned one recovers from."""

  teacher: str = ''
  """The teacher's run folder or checkpoint (RUN or RUN/checkpoints/<step>); '' = none.
  Same tokenizer as this run; any shape."""
  kl_weight: float = 1.0
  """Weight of KL(teacher || student) on the next-token distributions, times T^2."""
  ce_weight: float = 1.0
  """Weight of the usual next-token loss beside it (0 = the teacher alone, as Minitron)."""
  temperature: float = 1.0
  """T: both distributions are softmax(logits / T) in the KL term."""

  def __post_init__(self) -> None:
    for key in ('kl_weight', 'ce_weight'):
      if getattr(self, key) < 0:
        raise ValueError(f'distill.{key}: must be >= 0 (got {getattr(self, key)!r})')
    if self.temperature <= 0:
      raise ValueError(f'distill.temperature: must be positive (got {self.temperature!r})')


class Configs(NamedTuple):
  run: RunConfig
  mesh: MeshConfig
  model: ModelConfig
  optimizer: OptimizerConfig
  data: DataConfig
  loss: LossConfig = LossConfig()
  wandb: WandbConfig = WandbConfig()
  distill: DistillConfig = DistillConfig()


# Keys that moved, old name -> new. default_config links each old name to the new key
# (a FieldReference), so command lines and config files that use it keep working; here
# the old name is folded in for config.json files written before the move.
MOVED_KEYS = {'model.loss_chunk': 'loss.chunk'}


SECTIONS = {'mesh': MeshConfig, 'model': ModelConfig, 'optimizer': OptimizerConfig,
            'data': DataConfig, 'loss': LossConfig, 'wandb': WandbConfig,
            'distill': DistillConfig}
# Runs written before they existed lack them.
OPTIONAL_SECTIONS = ('loss', 'wandb', 'distill')


def _section(cls, d: Any, prefix: str):
  if not isinstance(d, Mapping):
    raise ValueError(f'{prefix.rstrip(".") or "config"}: expected a section of keys '
                     f'(got {d!r})')
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'unknown config key {prefix}{unknown[0]}')
  return cls.from_dict(d) if hasattr(cls, 'from_dict') else cls(**d)


def _fold_moved_keys(d: dict[str, Any]) -> None:
  for old, new in MOVED_KEYS.items():
    (old_section, old_key), (new_section, new_key) = old.split('.'), new.split('.')
    if old_key not in d.get(old_section, {}):
      continue
    value, target = d[old_section].pop(old_key), d.setdefault(new_section, {})
    if target.setdefault(new_key, value) != value:
      raise ValueError(f'{old}={value} and {new}={target[new_key]} disagree; {old} is '
                       f'the old name of {new}: set {new} only')


def parse(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Configs:
  """Validates every section once; errors name the offending key.

  Each section checks itself when it is made (`section.key: why (got value)`); the
  checks across sections are made here.
  """
  if isinstance(config, ml_collections.ConfigDict):
    d = config.to_dict()
  elif isinstance(config, Mapping):
    d = copy.deepcopy(dict(config))  # Folding moved keys must not edit the caller's dict.
  else:
    raise ValueError(f'expected an object of config keys and sections (got '
                     f'{type(config).__name__})')
  _fold_moved_keys(d)
  for name in SECTIONS:
    if name not in d and name not in OPTIONAL_SECTIONS:
      raise ValueError(f'{name}: the section is missing')
  sections = {name: _section(cls, d.pop(name, {}), f'{name}.') for name, cls in SECTIONS.items()}
  cfgs = Configs(run=_section(RunConfig, d, ''), **sections)
  cfgs.loss.check_rows(cfgs.run.seq_len)
  _check_context(cfgs)
  if cfgs.run.batch_size % cfgs.optimizer.grad_accum:
    raise ValueError(f'optimizer.grad_accum: must divide batch_size={cfgs.run.batch_size} '
                     f'(got {cfgs.optimizer.grad_accum!r})')
  _check_experts(cfgs)
  if cfgs.optimizer.hold_zeros and not cfgs.run.init_from:
    # A fresh init has zeros too (zero_init_out's projections): they would never train.
    raise ValueError('optimizer.hold_zeros: holds the zeros of the run init_from names '
                     '(a pruned run); set init_from (got True with init_from empty)')
  return cfgs


def _check_context(cfgs: Configs) -> None:
  n = cfgs.mesh.context
  if n in (1, -1):  # -1 is resolved against the devices; the model checks its rows then.
    return
  if cfgs.run.seq_len % (2 * n):
    raise ValueError(f'seq_len: must be divisible by 2 x mesh.context={n}, as the context '
                     f'axis splits each row into 2 x {n} chunks (got {cfgs.run.seq_len!r})')
  if cfgs.model.attention == 'cudnn':
    raise ValueError(f"model.attention: cuDNN's fused attention needs whole rows, and "
                     f"mesh.context={n} splits them; use 'auto' or 'xla' (got 'cudnn')")


def _check_experts(cfgs: Configs) -> None:
  n, moe = cfgs.mesh.expert, cfgs.model.moe
  if n > 1 and moe.enabled and moe.num_experts % n:
    raise ValueError(f'mesh.expert: {n} does not divide model.moe.num_experts='
                     f'{moe.num_experts}, and each device holds whole experts (got {n})')


def default_config() -> ml_collections.ConfigDict:
  """Every key at its default (configs/base.py): built from the dataclasses above and in
  each section's config module, where each key is declared and documented once."""
  defaults = Configs(RunConfig(), *(cls() for cls in SECTIONS.values()))
  config = ml_collections.ConfigDict(as_dict(defaults))
  for old, new in MOVED_KEYS.items():  # The old name set sets the new key, and back.
    (old_section, old_key), (new_section, new_key) = old.split('.'), new.split('.')
    config[old_section][old_key] = config[new_section].get_ref(new_key)
  return config


def as_dict(cfgs: Configs) -> dict[str, Any]:
  """The typed configs as the nested dict a ConfigDict of them would give (parse reads it
  back): the top-level keys, then one dict per section."""
  return {**dataclasses.asdict(cfgs.run),
          **{name: dataclasses.asdict(section) for name, section in cfgs._asdict().items()
             if name != 'run'}}



def set_key(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """Sets the dotted `key` of `config` in place from its command-line text; returns the
  value set.

  The text is a Python literal (128, 1e-3, True, 'a'), else a plain string; `true` and
  `false` also set a bool, as `--config.KEY=true` does. Errors are ValueErrors:
  `no config key K`, `cannot set K='v': <why>`.
  """
  *parents, name = key.split('.')
  node = config
  try:
    for p in parents:
      node = node[p]
    if name not in node:
      raise KeyError(name)
    value = _literal(text)
    if isinstance(node[name], bool) and text.lower() in ('true', 'false'):
      value = text.lower() == 'true'
    node[name] = value  # The ConfigDict refuses a value of another type.
  except (KeyError, AttributeError):
    raise ValueError(f'no config key {key}') from None
  except TypeError as e:
    raise ValueError(f'cannot set {key}={text!r}: {e}') from None
  return node[name]


def parse_values(spec: str, flag: str) -> tuple[str, tuple[str, ...]]:
  """`KEY=V1,V2,...` (a --grid or a --vary) -> (the key, its values as written).

  ValueError `FLAG='SPEC': expected KEY=V1,V2,... with no empty value`.
  """
  key, sep, values = spec.partition('=')
  key = key.strip()
  texts = tuple(v.strip() for v in values.split(','))
  if not sep or not key or ' ' in key or not all(texts):
    raise ValueError(f'{flag}={spec!r}: expected KEY=V1,V2,... with no empty value')
  return key, texts


def with_values(config: ml_collections.ConfigDict, settings: Sequence[tuple[str, str]],
                flag: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """A copy of `config` with each (key, text) of `settings` set as `set_key` sets it, and
  the values set. The copy is deep, so linked keys (MOVED_KEYS) stay linked.

  ValueError `FLAG KEY: no config key KEY` or `FLAG KEY: cannot set KEY='v': why`.
  """
  out = copy.deepcopy(config)
  values = {}
  for key, text in settings:
    try:
      values[key] = set_key(out, key, text)
    except ValueError as e:
      raise ValueError(f'{flag} {key}: {e}') from None
  return out, values


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
