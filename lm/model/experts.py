"""Running routed tokens through their experts: grouped matmuls on one device, and the
all-to-all exchange of expert parallelism (lm/model/moe.py routes; this computes).

Two ways to run a group of rows through each expert (`model.moe.impl`):
  ragged    the rows sorted by expert, one `jax.lax.ragged_dot` per matrix: no buffer
            beyond the rows themselves, and nothing dropped.
  capacity  each expert's rows copied into a fixed (E, C, D) buffer and one batched
            einsum per matrix: portable to any backend, but C slots per expert.
Buffers (the exchange's, and capacity's) hold the worst case by default, so nothing is
dropped; `model.moe.capacity_factor` > 0 sizes them at that many times the mean load
instead, and copies past the end are dropped (their tokens keep the residual and the
other experts' outputs; the metrics count them).

Shapes: N tokens, K experts per token, M = N K copies, E experts (on this device), D
d_model, F expert width, P devices on the expert axis, C rows of a buffer, R rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lm.mesh import EXPERT_AXIS
from lm.sharding import AxisRules

Weights = tuple[jax.Array, jax.Array, jax.Array]  # gate (E, D, F), up (E, D, F), down (E, F, D)


class Dispatch(NamedTuple):
  """How a layer runs its experts (the model.moe.* keys that say it)."""

  impl: str = 'ragged'
  capacity_factor: float = 0.0  # 0: every buffer holds the worst case.


DROPLESS = Dispatch()


def _rows(worst: int, mean: float, factor: float) -> int:
  """A buffer's rows: the worst case, or `factor` x the mean load (never above worst)."""
  if not factor:
    return worst
  return max(1, min(worst, math.ceil(factor * mean)))


def _slots(group_R: jax.Array, groups: int) -> jax.Array:
  """Each row's place among the rows of its group, in row order (ids >= groups: 0)."""
  onehot_RxG = jax.nn.one_hot(group_R, groups, dtype=jnp.int32)
  return jnp.sum((jnp.cumsum(onehot_RxG, axis=0) - 1) * onehot_RxG, axis=1)


def _ragged(x_RxD: jax.Array, expert_R: jax.Array, weights: Weights, e: int) -> jax.Array:
  order_R = jnp.argsort(expert_R, stable=True)
  sizes_E = jnp.sum(jax.nn.one_hot(expert_R, e, dtype=jnp.int32), axis=0)
  w_gate, w_up, w_down = weights
  x_RxD = x_RxD[order_R]  # Rows past the groups (expert id e) come out zero.
  h_RxF = nn.silu(jax.lax.ragged_dot(x_RxD, w_gate, sizes_E)) * jax.lax.ragged_dot(
      x_RxD, w_up, sizes_E)
  y_RxD = jax.lax.ragged_dot(h_RxF, w_down, sizes_E)
  return jnp.zeros_like(y_RxD).at[order_R].set(y_RxD)


def _capacity(x_RxD: jax.Array, expert_R: jax.Array, weights: Weights, e: int,
              slots: int) -> tuple[jax.Array, jax.Array]:
  slot_R = _slots(expert_R, e)
  kept_R = (expert_R < e) & (slot_R < slots)
  at = (jnp.where(kept_R, expert_R, e), slot_R)  # Index e is out of range: not written.
  buf_ExCxD = jnp.zeros((e, slots, x_RxD.shape[1]), x_RxD.dtype).at[at].set(x_RxD, mode='drop')
  w_gate, w_up, w_down = weights
  h_ExCxF = nn.silu(jnp.einsum('ecd,edf->ecf', buf_ExCxD, w_gate)) * jnp.einsum(
      'ecd,edf->ecf', buf_ExCxD, w_up)
  y_ExCxD = jnp.einsum('ecf,efd->ecd', h_ExCxF, w_down)
  return y_ExCxD.at[at].get(mode='fill', fill_value=0), kept_R


def _through_experts(x_RxD: jax.Array, expert_R: jax.Array, weights: Weights, how: Dispatch,
                     slots: int) -> tuple[jax.Array, jax.Array]:
  """(row r through expert expert_R[r], whether it was: an id >= E or a full buffer
  gives a zero row)."""
  e = weights[0].shape[0]
  if how.impl == 'ragged':
    return _ragged(x_RxD, expert_R, weights, e), expert_R < e
  return _capacity(x_RxD, expert_R, weights, e, slots)


def _mix(y_MxD: jax.Array, weights_NxK: jax.Array) -> jax.Array:
  n, k = weights_NxK.shape
  return jnp.einsum('nkd,nk->nd', y_MxD.reshape(n, k, -1), weights_NxK.astype(y_MxD.dtype))


def experts_local(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                  weights: Weights, how: Dispatch = DROPLESS) -> tuple[jax.Array, jax.Array]:
  """(sum_k weight_k expert_k(x) for every token, copies dropped), all E experts on
  this device."""
  n, k = experts_NxK.shape
  e = weights[0].shape[0]
  x_MxD = jnp.repeat(x_NxD, k, axis=0)  # Copy m = n K + j is token n for its j-th expert.
  # A token's k experts are distinct: an expert gets at most N copies.
  y_MxD, kept_M = _through_experts(x_MxD, experts_NxK.reshape(-1), weights, how,
                                   _rows(n, n * k / e, how.capacity_factor))
  return _mix(y_MxD, weights_NxK), jnp.sum(~kept_M).astype(jnp.float32)


def experts_exchanged(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                      weights: Weights, how: Dispatch = DROPLESS, *, devices: int,
                      axis: str = EXPERT_AXIS) -> tuple[jax.Array, jax.Array]:
  """As experts_local, inside shard_map over `axis` of P = `devices`, which holds E / P
  experts per device (global expert e on device e // (E / P)). Token copies go to their
  experts' devices by all-to-all, through each device's experts, and back. The copies
  dropped are counted where they are dropped (sender or receiver)."""
  n, k = experts_NxK.shape
  per_device = weights[0].shape[0]
  # At most min(K, E / P) of a token's k distinct experts live on one device.
  c = _rows(n * min(k, per_device), n * k / devices, how.capacity_factor)
  expert_M = experts_NxK.reshape(-1)
  dest_M = expert_M // per_device
  slot_M = _slots(dest_M, devices)  # Among the copies bound for the same device.
  sent_M = slot_M < c
  at = (jnp.where(sent_M, dest_M, devices), slot_M)  # Index P: past the end, not sent.
  x_MxD = jnp.repeat(x_NxD, k, axis=0)
  send_PxCxD = jnp.zeros((devices, c, x_NxD.shape[1]), x_NxD.dtype).at[at].set(x_MxD,
                                                                              mode='drop')
  # Empty slots name expert `per_device`: none, a zero row.
  send_PxC = jnp.full((devices, c), per_device, jnp.int32).at[at].set(expert_M % per_device,
                                                                      mode='drop')
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0,
                               concat_axis=0, tiled=True)
  recv_PxCxD, recv_PxC = exchange(send_PxCxD), exchange(send_PxC)
  recv_R = recv_PxC.reshape(-1)
  # Each source sends an expert at most min(N, C) copies.
  slots = _rows(devices * min(n, c), n * k / per_device, how.capacity_factor)
  y_RxD, kept_R = _through_experts(recv_PxCxD.reshape(devices * c, -1), recv_R, weights,
                                   how, slots)
  back_PxCxD = exchange(y_RxD.reshape(devices, c, -1))
  y_MxD = back_PxCxD.at[at].get(mode='fill', fill_value=0)
  dropped = jnp.sum(~sent_M) + jnp.sum((recv_R < per_device) & ~kept_R)
  return _mix(y_MxD, weights_NxK), dropped.astype(jnp.float32)


def dense_reference(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                    weights: Weights) -> jax.Array:
  """Every expert on every token, masked by the routing: the plain definition (tests)."""
  w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = weights
  e = w_gate_ExDxF.shape[0]
  mix_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, e, dtype=weights_NxK.dtype)
                    * weights_NxK[..., None], axis=1)
  gate_NxExF = jnp.einsum('nd,edf->nef', x_NxD, w_gate_ExDxF)
  up_NxExF = jnp.einsum('nd,edf->nef', x_NxD, w_up_ExDxF)
  y_NxExD = jnp.einsum('nef,efd->ned', nn.silu(gate_NxExF) * up_NxExF, w_down_ExFxD)
  return jnp.einsum('ned,ne->nd', y_NxExD, mix_NxE.astype(y_NxExD.dtype))


def run_experts(x_BxTxD: jax.Array, experts_BxTxK: jax.Array, mix_BxTxK: jax.Array,
                weights: Weights, rules: AxisRules | None, how: Dispatch = DROPLESS
                ) -> tuple[jax.Array, jax.Array]:
  """(the routed experts' mixed output for every token, copies dropped in all): on one
  device, or per device of the mesh (each with its own tokens), exchanging tokens over
  the expert axis."""
  b, t, d = x_BxTxD.shape
  k = experts_BxTxK.shape[-1]
  flat = lambda a: a.reshape(-1, a.shape[-1])

  def whole():  # Every token in one computation, all experts at hand.
    y, dropped = experts_local(flat(x_BxTxD), flat(experts_BxTxK), flat(mix_BxTxK), weights,
                               how)
    return y.reshape(b, t, d), dropped

  if rules is None:
    return whole()
  devices = rules.mesh.shape[EXPERT_AXIS]
  rows = rules.spec(('batch', 'length', None), (b, t, k))
  split = tuple(a for entry in rows[:2] for a in _axes(entry))
  if devices > 1 and EXPERT_AXIS not in split:
    # Rows too few to split over the expert axis (the one-row init, a single prompt): one
    # global computation, which the partitioner lays out. Training batches always split
    # (step_parts checks the batch against the mesh).
    return whole()

  def per_device(x, experts, mix, *ws):
    bl, tl = x.shape[:2]
    args = (flat(x), flat(experts), flat(mix), ws, how)
    y, dropped = (experts_local(*args) if devices == 1 else
                  experts_exchanged(*args, devices=devices))
    # The devices holding other rows count their own drops; replicas (tensor) do not add.
    return y.reshape(bl, tl, d), jax.lax.psum(dropped, split) if split else dropped

  experts_spec = PartitionSpec(EXPERT_AXIS if devices > 1 else None)
  fn = jax.shard_map(per_device, mesh=rules.mesh,
                     in_specs=(rows, rows, rows) + (experts_spec,) * len(weights),
                     out_specs=(rows, PartitionSpec()))
  return fn(x_BxTxD, experts_BxTxK, mix_BxTxK, *weights)


def _axes(spec_entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)
