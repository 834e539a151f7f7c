"""The mapping of logical axis names onto the device mesh (lm/mesh.py makes the mesh).

The model names the axes of every parameter and main activation (`embed`, `heads`,
`vocab`, ...). The config maps those names onto mesh axes (`data`, `fsdp`, `tensor`).
Nothing else in `lm/` writes a PartitionSpec by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.mesh import MeshConfig, Rules, as_axes, make_mesh


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical axis names -> mesh axes, bound to one mesh."""

  mesh: Mesh
  rules: Rules

  @classmethod
  def from_config(cls, cfg: MeshConfig,
                  devices: Sequence[jax.Device] | None = None) -> AxisRules:
    """The config's mesh over `devices` (default: all), with the config's rules bound."""
    return cls(make_mesh(cfg, devices), cfg.rules)

  def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose axes carry `names`.

    A mesh axis that does not divide its dimension (say 4 kv heads on 8-way tensor
    parallelism) is dropped, so that dimension is replicated over it instead of failing.
    Each mesh axis is used at most once per array.
    """
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape, strict=True):
      axes = []
      size = 1
      for ax in as_axes(table.get(name)) if name else ():
        n = self.mesh.shape[ax]
        if ax in used or n == 1 or dim % (size * n):
          continue
        axes.append(ax)
        size *= n
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)

  def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def constrain(x: jax.Array, names: Sequence[str | None], rules: AxisRules | None) -> jax.Array:
  """Sharding constraint on an activation; a no-op without a mesh."""
  return x if rules is None else rules.constrain(x, names)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def tree_shardings(abstract_tree: Any, rules: AxisRules) -> Any:
  """Shardings for a tree whose leaves may be Linen `LogicallyPartitioned` boxes.

  Boxed leaves are sharded by their logical names; anything else (step counters,
  RNG keys, optimizer counts) is replicated. The result has the unboxed structure.
  """

  def one(x):
    if _is_box(x) and not jax.tree.leaves(x.value):
      return x.value  # An empty node (optax's MaskedNode: no state kept here).
    if _is_box(x):
      return rules.sharding(x.names, x.value.shape)
    return rules.replicated()

  return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def batch_sharding(rules: AxisRules, shape: Sequence[int]) -> NamedSharding:
  """Token batches: rows over the batch axes, positions replicated."""
  return rules.sharding(('batch', 'length'), shape)


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles each process's rows into one global array (single- or multi-host)."""
  global_shape = (local_rows.shape[0] * jax.process_count(),) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def put_rows(rows: Any, rules: AxisRules) -> Any:
  """This process's rows (any pytree of (b, ...) arrays) as global arrays on the devices.

  Training and evaluation alike: each leaf's global batch has b * process_count rows,
  sharded over the batch axes.
  """
  def put(local: np.ndarray) -> jax.Array:
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return global_batch(local, batch_sharding(rules, shape))

  return jax.tree.map(put, rows)
