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

# The mesh's axes, outermost first. Context is innermost: a ring passes blocks between
# neighbours; the experts' all-to-all stays close too.
MESH_AXES = ('data', 'fsdp', 'tensor', 'expert', 'context')
CONTEXT_AXIS = 'context'  # Splits each row's tokens (lm/model/context.py).
EXPERT_AXIS = 'expert'  # Splits the experts of MoE layers (lm/model/moe.py).

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
  context: int = 1
  """Context (sequence) parallelism: each row's tokens split over this many devices, and
  attention runs across them as model.context_attention says (lm/model/context.py)."""
  expert: int = 1
  """Expert parallelism: the experts of each MoE layer split over this many devices,
  tokens sent to their experts and back by all-to-all (lm/model/moe.py). Outside the
  experts these devices are data parallel."""
  rules: Rules = (('batch', ('data', 'fsdp', 'expert')),
                  ('embed', ('fsdp', 'context', 'expert')),
                  ('heads', ('tensor',)), ('kv_heads', ('tensor',)), ('mlp', ('tensor',)),
                  ('vocab', ('tensor',)), ('length', ('context',)), ('head_dim', ()),
                  ('layers', ()), ('experts', ('expert',)))
  """Logical axis name -> mesh axes. A dimension that a mesh axis does not divide is
  replicated over that axis instead of failing. The parameters shard over `context`
  and `expert` as over `fsdp` (their devices would otherwise each hold them whole);
  activations' `length` claims `context` first, so their `embed` stays whole, and the
  experts' own axis claims `expert` before their `embed` can."""

  def __post_init__(self) -> None:
    sizes = self._sizes()
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

  def _sizes(self) -> dict[str, int]:
    return {axis: getattr(self, axis) for axis in MESH_AXES}

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """The axes' sizes in MESH_AXES order, a -1 resolved to the devices that remain;
    errors name the bad key."""
    sizes = self._sizes()
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
          f'mesh: {"*".join(MESH_AXES)} = {fixed} but there are {num_devices} devices')
    return tuple(sizes[axis] for axis in MESH_AXES)


def as_axes(axes: Any) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor, expert, context) mesh with Auto axes, as Linen's logical sharding
  expects."""
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
