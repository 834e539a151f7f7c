"""AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'wsd', 'constant')

# Parameters whose final name is listed here are not decayed: norm gains would shrink
# towards zero, which has nothing to do with regularising the function.
NO_DECAY = frozenset({'scale', 'bias'})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr: float = 3e-3
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
    if not self.lr > 0:  # A zero or negative rate trains nothing, or ascends: never meant.
      raise ValueError(f'optimizer.lr must be positive, got {self.lr}')
    for key in ('min_lr', 'weight_decay', 'clip_norm', 'eps', 'z_loss'):
      if getattr(self, key) < 0:
        raise ValueError(f'optimizer.{key} must be >= 0, got {getattr(self, key)}')
    for key in ('b1', 'b2'):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(f'optimizer.{key} must be in [0, 1), got {getattr(self, key)}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'optimizer.schedule: expected one of {SCHEDULES}, got {self.schedule!r}')
    if self.grad_accum < 1:
      raise ValueError(f'optimizer.grad_accum must be >= 1, got {self.grad_accum}')
    if not 0.0 <= self.decay_fraction <= 1.0:
      raise ValueError(f'optimizer.decay_fraction must be in [0, 1], got {self.decay_fraction}')
    if self.warmup_steps < 0:
      raise ValueError(f'optimizer.warmup_steps must be >= 0, got {self.warmup_steps}')


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to min_lr, WSD, or constant."""
  warmup = min(cfg.warmup_steps, total_steps)
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.min_lr)
  ramp = optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
  if cfg.schedule == 'constant':
    return optax.join_schedules([ramp, optax.constant_schedule(cfg.lr)], [warmup])
  # Warmup-stable-decay: hold the peak, then decay linearly to min_lr over the last
  # decay_fraction of training (so any stable-phase checkpoint can be cooled down later).
  decay = int(round(total_steps * cfg.decay_fraction))
  stable = max(total_steps - decay - warmup, 0)
  return optax.join_schedules(
      [ramp, optax.constant_schedule(cfg.lr),
       optax.linear_schedule(cfg.lr, cfg.min_lr, max(decay, 1))],
      [warmup, warmup + stable])


def _last_name(path: tuple[Any, ...]) -> str:
  names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ''


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embeddings, not norms or biases."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _last_name(p) not in NO_DECAY, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw


def global_norm(tree: Any) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
