"""Logically-partitioned initialisers the model's layers share (transformer.py, moe.py)."""

from __future__ import annotations

import flax.linen as nn


def init(names: tuple[str, ...], scale: float = 1.0, *, ones: bool = False):
  """A logically-partitioned initialiser: N(0, scale^2 / fan_in) or ones."""
  if ones:
    base = nn.initializers.ones_init()
  else:
    base = nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal')
  return nn.with_logical_partitioning(base, names)


def dense_init(names: tuple[str, ...], fan_in_axes: tuple[int, ...], scale: float = 1.0,
               *, zeros: bool = False):
  """N(0, scale^2 / fan_in) over the `fan_in_axes` (every other axis is an output or,
  for an MoE layer's experts, a batch of matrices alike), or zeros."""
  if zeros:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)
  base = nn.initializers.variance_scaling(
      scale, 'fan_in', 'truncated_normal', in_axis=fan_in_axes,
      out_axis=tuple(i for i in range(len(names)) if i not in fan_in_axes))
  return nn.with_logical_partitioning(base, names)
