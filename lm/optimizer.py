"""AdamW or Muon, with a learning-rate schedule, global-norm clipping and a weight-decay mask.

`name='adamw'`: AdamW on every parameter. `name='muon'`: Muon (optax.contrib.muon) on the
hidden weight matrices, each orthogonalised as the matrix it is (see `muon_dimensions`),
and the same AdamW as above on the rest: embeddings, the output head, norm gains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

OPTIMIZERS = ('adamw', 'muon')
# How Muon scales a matrix before its first Newton-Schulz iteration (optax's names):
# Frobenius norm (the reference), spectral norm, AOL's per-row rescaling, or the
# Schatten-4 norm; the last two bring small singular values nearer 1 in fewer iterations.
MUON_PRECONDITIONINGS = ('frobenius', 'spectral', 'aol', 'schatten')
SCHEDULES = ('cosine', 'wsd', 'constant')

# Parameters whose final name is listed here are not decayed: norm gains would shrink
# towards zero, which has nothing to do with regularising the function.
NO_DECAY = frozenset({'scale', 'bias'})


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


def muon_dimensions(names: tuple[str | None, ...]) -> MuonDimensionNumbers | None:
  """How Muon sees a parameter whose axes carry these logical names; None: AdamW's.

  A hidden matrix maps the residual stream (`embed`) to something else, or back. The axes
  on the other side of `embed` are folded into one: q (D, N, H) is the D x (N*H) matrix
  of `x @ W` (reduction D, output N, H), the attention output (N, H, D) is (N*H) x D.
  `layers` (stacked blocks under scan) is a batch axis: one matrix per layer. Anything
  with `vocab` (embeddings, the output head) or fewer than two matrix axes (norm gains)
  is AdamW's.
  """
  if 'vocab' in names:
    return None
  axes = tuple(i for i, name in enumerate(names) if name != 'layers')
  if len(axes) < 2:
    return None
  if 'embed' in names and names.index('embed') == axes[0]:
    return MuonDimensionNumbers(reduction_axis=axes[0], output_axis=axes[1:])
  if 'embed' in names and names.index('embed') == axes[-1]:
    return MuonDimensionNumbers(reduction_axis=axes[:-1], output_axis=axes[-1])
  raise ValueError(f'optimizer.name=muon: no matrix layout for a parameter with axes {names} '
                   "(expected 'embed' first or last)")


def _is_names(x: Any) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def _muon(cfg: OptimizerConfig, total_steps: int, param_axes: Any,
          adamw: optax.GradientTransformation) -> optax.GradientTransformation:
  """Muon on the hidden matrices, `adamw` on the rest, on one schedule shape.

  The Muon rate is AdamW's schedule scaled by muon_lr / lr (min_lr included). Weight
  decay is decoupled and, as in optax, PyTorch and the reference Muon, multiplied by each
  part's own rate.
  """
  dims = jax.tree.map(muon_dimensions, param_axes, is_leaf=_is_names)
  is_dims = lambda x: x is None or isinstance(x, MuonDimensionNumbers)
  labels = jax.tree.map(lambda d: 'adamw' if d is None else 'muon', dims, is_leaf=is_dims)
  # Inside the partition the Muon branch sees AdamW's parameters as MaskedNodes; its
  # dimension numbers must have that structure.
  muon_dims = jax.tree.map(lambda d: optax.MaskedNode() if d is None else d, dims,
                           is_leaf=is_dims)
  scale = cfg.muon_lr / cfg.lr
  muon_schedule = schedule(
      dataclasses.replace(cfg, lr=cfg.muon_lr, min_lr=cfg.min_lr * scale), total_steps)
  muon = optax.contrib.muon(muon_schedule, ns_steps=cfg.muon_ns_steps,
                            preconditioning=cfg.muon_preconditioning,
                            weight_decay=cfg.weight_decay, muon_weight_dimension_numbers=muon_dims)
  return optax.partition({'muon': muon, 'adamw': adamw}, labels)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its own constant (a tree like the params)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, param_axes: Any = None,
                   lr_scales: Any = None) -> optax.GradientTransformation:
  """The optimizer a config describes. `param_axes`: the parameters' logical axis names,
  a tuple per parameter (lm.model.param_axes); Muon needs them, AdamW ignores them.

  `lr_scales` (lm.mup.lr_scales; None = all 1): AdamW's per-parameter rate multipliers,
  which scale its decoupled decay too. Only hidden matrices have one other than 1, and
  under Muon those are Muon's, whose updates are already scaled for their shape.
  """
  lr = schedule(cfg, total_steps)
  tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                   mask=decay_mask)
  if lr_scales is not None and cfg.name == 'adamw':
    tx = optax.chain(tx, scale_by_tree(lr_scales))
  if cfg.name == 'muon':
    if param_axes is None:
      raise ValueError("optimizer.name='muon' needs the parameters' logical axis names")
    tx = _muon(cfg, total_steps, param_axes, tx)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


def global_norm(tree: Any) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
