"""The device mesh: `MeshConfig` (the `mesh.*` keys) and the mesh it makes.

lm/sharding.py maps the model's logical axis names onto this mesh's axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

MESH_AXES = ('data', 'fsdp', 'tensor')

Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The `mesh.*` keys: the device mesh. The axes' product is the number of devices;
  one of them may be -1, the devices that remain."""

  data: int = -1
  """Pure data parallelism (parameters replicated)."""
  fsdp: int = 1
  """Data parallelism with the parameters and optimizer state sharded."""
  tensor: int = 1
  """Tensor (model) parallelism over heads, MLP width and vocabulary."""
  rules: Rules = (('batch', ('data', 'fsdp')), ('embed', ('fsdp',)), ('heads', ('tensor',)),
                  ('kv_heads', ('tensor',)), ('mlp', ('tensor',)), ('vocab', ('tensor',)),
                  ('length', ()), ('head_dim', ()), ('layers', ()))
  """Logical axis name -> mesh axes. A dimension that a mesh axis does not divide is
  replicated over that axis instead of failing."""

  def __post_init__(self) -> None:
    sizes = {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}
    for k, v in sizes.items():
      if v == 0 or v < -1:
        raise ValueError(f'mesh.{k}: must be positive or -1 (got {v!r})')
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
      raise ValueError(f'mesh.{free[1]}: only one axis may be -1, and mesh.{free[0]} is '
                       '(got -1)')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
    """From the `mesh` section, its rules in any form as_axes takes (None, 'a', ['a'])."""
    rules = tuple((name, as_axes(axes)) for name, axes in d.get('rules', cls.rules))
    return cls(**{**d, 'rules': rules})

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """Resolves a -1 entry to the devices that remain; errors name the bad key."""
    sizes = {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
      if num_devices % fixed:
        raise ValueError(
            f'mesh: {num_devices} devices cannot be split with '
            + ', '.join(f'mesh.{k}={v}' for k, v in sizes.items()))
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(
          f'mesh: data*fsdp*tensor = {fixed} but there are {num_devices} devices')
    return sizes['data'], sizes['fsdp'], sizes['tensor']


def as_axes(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes, as Linen's logical sharding expects."""
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
