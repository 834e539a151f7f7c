"""The optimizer's config: `OptimizerConfig`, the `optimizer.*` keys, validated when made
from a dict. lm/optim/optimizer.py builds the optax transformation from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

OPTIMIZERS = ('adamw', 'muon')
# How Muon scales a matrix before its first Newton-Schulz iteration (optax's names):
# Frobenius norm (the reference), spectral norm, AOL's per-row rescaling, or the
# Schatten-4 norm; the last two bring small singular values nearer 1 in fewer iterations.
MUON_PRECONDITIONINGS = ('frobenius', 'spectral', 'aol', 'schatten')
SCHEDULES = ('cosine', 'wsd', 'constant')

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = 'adamw'
  lr: float = 3e-3
  muon_lr: float = 0.02
  muon_ns_steps: int = 5
  muon_preconditioning: str = 'frobenius'
  min_lr: float = 3e-4
  warmup_steps: int = 50
  schedule: str = 'cosine'
  decay_fraction: float = 0.2
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  grad_accum: int = 1
  z_loss: float = 0.0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> OptimizerConfig:
    cfg = cls(**dict(d))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    if self.name not in OPTIMIZERS:
      raise ValueError(f'optimizer.name: expected one of {OPTIMIZERS}, got {self.name!r}')
    for key in ('lr', 'muon_lr'):  # A zero or negative rate trains nothing, or ascends.
      if not getattr(self, key) > 0:
        raise ValueError(f'optimizer.{key} must be positive, got {getattr(self, key)}')
    for key in ('min_lr', 'weight_decay', 'clip_norm', 'eps', 'z_loss'):
      if getattr(self, key) < 0:
        raise ValueError(f'optimizer.{key} must be >= 0, got {getattr(self, key)}')
    for key in ('b1', 'b2'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f'optimizer.{key} must be in [0, 1), got {getattr(self, key)}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'optimizer.schedule: expected one of {SCHEDULES}, got {self.schedule!r}')
    if self.muon_ns_steps < 1:
      raise ValueError(f'optimizer.muon_ns_steps must be >= 1, got {self.muon_ns_steps}')
    if self.muon_preconditioning not in MUON_PRECONDITIONINGS:
      raise ValueError(f'optimizer.muon_preconditioning: expected one of '
                       f'{MUON_PRECONDITIONINGS}, got {self.muon_preconditioning!r}')
    if self.grad_accum < 1:
      raise ValueError(f'optimizer.grad_accum must be >= 1, got {self.grad_accum}')
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f'optimizer.decay_fraction must be in [0, 1], got {self.decay_fraction}')
    if self.warmup_steps < 0:
      raise ValueError(f'optimizer.warmup_steps must be >= 0, got {self.warmup_steps}')
