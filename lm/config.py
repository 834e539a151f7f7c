"""Turns the ml-collections ConfigDict at the edge into small typed configs.

Each part of the library receives only its own dataclass; nothing below the entry
points sees the whole ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from data.config import DataConfig
from lm.model import ModelConfig
from lm.optimizer import OptimizerConfig
from lm.sharding import MeshConfig
from lm.wandb_writer import WandbConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The top-level keys: how long to train, how often to log, evaluate and save."""

  name: str = 'base'
  workdir: str = 'runs/base'
  seed: int = 0
  steps: int = 1000
  batch_size: int = 8
  seq_len: int = 128
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  init_from: str = ''
  max_nonfinite_steps: int = 10

  def validate(self) -> None:
    for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'keep_checkpoints'):
      if getattr(self, key) <= 0:
        raise ValueError(f'{key} must be positive, got {getattr(self, key)}')
    for key in ('eval_every', 'eval_batches', 'checkpoint_every', 'max_nonfinite_steps'):
      if getattr(self, key) < 0:
        raise ValueError(f'{key} must be >= 0, got {getattr(self, key)}')


class Configs(NamedTuple):
  run: RunConfig
  mesh: MeshConfig
  model: ModelConfig
  optimizer: OptimizerConfig
  data: DataConfig
  wandb: WandbConfig = WandbConfig()


def _section(cls, d: Mapping[str, Any], prefix: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'unknown config key {prefix}{unknown[0]}')
  return cls.from_dict(d) if hasattr(cls, 'from_dict') else cls(**d)


def parse(config: ml_collections.ConfigDict) -> Configs:
  """Validates every section once; errors name the offending key."""
  d = config.to_dict()
  sections = {k: d.pop(k) for k in ('mesh', 'model', 'optimizer', 'data')}
  wandb = _section(WandbConfig, d.pop('wandb', {}), 'wandb.')  # Older runs lack it.
  wandb.validate()
  run = _section(RunConfig, d, '')
  run.validate()
  data = _section(DataConfig, sections['data'], 'data.')
  cfgs = Configs(run=run, mesh=_section(MeshConfig, sections['mesh'], 'mesh.'),
                 model=_section(ModelConfig, sections['model'], 'model.'),
                 optimizer=_section(OptimizerConfig, sections['optimizer'], 'optimizer.'),
                 data=data, wandb=wandb)
  chunk = cfgs.model.loss_chunk
  if chunk and chunk < run.seq_len and run.seq_len % chunk:
    # A chunk that does not divide the rows would shrink to a divisor, possibly 1 token.
    raise ValueError(f'model.loss_chunk={chunk} does not divide seq_len={run.seq_len}')
  if run.batch_size % cfgs.optimizer.grad_accum:
    raise ValueError(f'optimizer.grad_accum={cfgs.optimizer.grad_accum} does not divide '
                     f'batch_size={run.batch_size}')
  return cfgs


def as_dict(cfgs: Configs) -> dict[str, Any]:
  """The typed configs as the nested dict a ConfigDict of them would give (parse reads it
  back): the top-level keys, then one dict per section."""
  return {**dataclasses.asdict(cfgs.run),
          **{name: dataclasses.asdict(section) for name, section in cfgs._asdict().items()
             if name != 'run'}}

