"""AdamW or Muon, with a learning-rate schedule, global-norm clipping and a weight-decay mask.

`name='adamw'`: AdamW on every parameter. `name='muon'`: Muon (optax.contrib.muon) on the
hidden weight matrices, each orthogonalised as the matrix it is (see `muon_dimensions`),
and the same AdamW as above on the rest: embeddings, the output head, norm gains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from lm.optim.config import OptimizerConfig

# Parameters whose final name is listed here are not decayed: norm gains would shrink
# towards zero, which has nothing to do with regularising the function.
NO_DECAY = frozenset({'scale', 'bias'})



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
  `layers` (stacked blocks under scan) and `experts` (an MoE layer's E experts) are
  batch axes: one matrix per layer and expert. Anything
  with `vocab` (embeddings, the output head) or fewer than two matrix axes (norm gains)
  is AdamW's.
  """
  if 'vocab' in names:
    return None
  axes = tuple(i for i, name in enumerate(names) if name not in ('layers', 'experts'))
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
  a tuple per parameter (lm.model.params.param_axes); Muon needs them, AdamW ignores them.

  `lr_scales` (lm.model.mup.lr_scales; None = all 1): AdamW's per-parameter rate multipliers,
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


def frozen(names: frozenset[str]) -> optax.GradientTransformation:
  """Zeroes the update of every parameter whose final name is in `names`: chained after
  the optimizer, nothing it would do (a step, weight decay) moves them. The train step
  sets such parameters itself (MoE's router bias, lm/model/moe.py)."""

  def update(updates, state, params=None):
    del params
    zero = lambda path, u: jnp.zeros_like(u) if _last_name(path) in names else u
    return jax.tree_util.tree_map_with_path(zero, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class HoldZerosState(NamedTuple):
  keep: Any  # Per parameter: True where it was nonzero at init.


def hold_zeros() -> optax.GradientTransformation:
  """Chained after the optimizer: the weights that are zero when the state is made (a
  pruned run's, lm/compress/) get no update, so they stay exactly zero. The mask lives in
  the optimizer state, so a resumed run holds the same weights."""

  def init(params):
    return HoldZerosState(jax.tree.map(lambda p: p != 0, params))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, k: jnp.where(k, u, 0), updates, state.keep), state

  return optax.GradientTransformation(init, update)


def global_norm(tree: Any) -> jax.Array:
  return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
