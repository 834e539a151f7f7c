"""A mixture of experts in place of the MLP: a router sends each token to k of E SwiGLU
experts and mixes their outputs (`model.moe.*`, lm/model/config.py MoEConfig).

Dropless: no capacity factor, no token dropped. The k copies of every token are sorted
by expert and run through grouped matmuls (`jax.lax.ragged_dot`), whose groups are the
experts' shares of the sorted rows. `dense_reference` (every expert on every token,
masked) computes the same thing the slow way, for the tests.

On a mesh the experts run per device inside `jax.shard_map`: each device routes its
own tokens; with an `expert` mesh axis of P > 1 each holds E / P experts, and the token
copies travel to their experts' devices and back by `jax.lax.all_to_all`. Its buffers
have the worst case's size (every copy of every token bound for one device), so the
exchange stays dropless with static shapes.

Load balancing, each optional: the Switch / GShard loss E * sum_e f_e P_e (f the
fraction of token copies expert e receives, P its mean router probability), the router
z-loss, and DeepSeek-V3's bias: a per-expert `router_bias` parameter added to the scores
for selection only, which no gradient moves; the train step nudges it against the load
error (`update_router_bias`).

Shapes: N tokens, E experts, K experts per token, M = N K token copies, D d_model,
F expert width, P devices on the expert axis, C rows one device sends another.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lm.mesh import EXPERT_AXIS
from lm.model.config import ModelConfig
from lm.sharding import AxisRules

BIAS = 'router_bias'  # The parameter the optimizer leaves alone (lm/optim/optimizer.py).
STATS = 'moe_stats'  # The collection each MoE layer sows its load and losses into.


class Routing(NamedTuple):
  experts_NxK: jax.Array  # int32: the k experts of each token, best first.
  weights_NxK: jax.Array  # float32: their mixing weights, summing to 1 per token.
  probs_NxE: jax.Array  # float32: router probabilities, summing to 1 per token.
  counts_E: jax.Array  # float32: token copies each expert receives.
  log_z_N: jax.Array  # float32: logsumexp of each token's router logits.


def route(logits_NxE: jax.Array, k: int, router: str,
          bias_E: jax.Array | None = None) -> Routing:
  """Top-k experts per token. `softmax`: of softmax probabilities; `sigmoid`: of per-expert
  sigmoid scores. `bias_E` is added to the scores for the choice only (never to the
  weights) and takes no gradient. Ties go to the lower expert index (lax.top_k's order)."""
  logits_NxE = logits_NxE.astype(jnp.float32)
  if router == 'softmax':
    scores_NxE = jax.nn.softmax(logits_NxE, axis=-1)
  else:
    scores_NxE = jax.nn.sigmoid(logits_NxE)
  select_NxE = scores_NxE if bias_E is None else scores_NxE + jax.lax.stop_gradient(bias_E)
  _, experts_NxK = jax.lax.top_k(select_NxE, k)
  weights_NxK = jnp.take_along_axis(scores_NxE, experts_NxK, axis=-1)
  weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
  probs_NxE = scores_NxE / jnp.sum(scores_NxE, axis=-1, keepdims=True)
  e = logits_NxE.shape[-1]
  counts_E = jnp.sum(jax.nn.one_hot(experts_NxK, e, dtype=jnp.float32), axis=(0, 1))
  return Routing(experts_NxK, weights_NxK, probs_NxE, jax.lax.stop_gradient(counts_E),
                 jax.nn.logsumexp(logits_NxE, axis=-1))


def balance_loss(r: Routing) -> jax.Array:
  """Switch Transformer's E * sum_e f_e P_e: 1 when the load is even, E when one expert
  takes every token. f carries no gradient; P does."""
  e = r.probs_NxE.shape[-1]
  f_E = r.counts_E / jnp.sum(r.counts_E)
  return e * jnp.sum(f_E * jnp.mean(r.probs_NxE, axis=0))


def router_z_loss(r: Routing) -> jax.Array:
  """ST-MoE's mean(logsumexp(logits)^2): keeps the router logits small."""
  return jnp.mean(jnp.square(r.log_z_N))


def _swiglu_grouped(x_MxD: jax.Array, sizes_E: jax.Array, w_gate_ExDxF: jax.Array,
                    w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array) -> jax.Array:
  """Each expert's SwiGLU on its group of the rows (sorted by expert); rows past the
  groups come out zero."""
  gate_MxF = jax.lax.ragged_dot(x_MxD, w_gate_ExDxF, sizes_E)
  up_MxF = jax.lax.ragged_dot(x_MxD, w_up_ExDxF, sizes_E)
  return jax.lax.ragged_dot(nn.silu(gate_MxF) * up_MxF, w_down_ExFxD, sizes_E)


def _expert_rows(x_RxD: jax.Array, expert_R: jax.Array, weights: tuple[jax.Array, ...],
                 num_experts: int) -> jax.Array:
  """Row r through expert expert_R[r] (an id >= num_experts: a zero row)."""
  order_R = jnp.argsort(expert_R, stable=True)
  sizes_E = jnp.sum(jax.nn.one_hot(expert_R, num_experts, dtype=jnp.int32), axis=0)
  y_RxD = _swiglu_grouped(x_RxD[order_R], sizes_E, *weights)
  return jnp.zeros_like(y_RxD).at[order_R].set(y_RxD)


def _mix(y_MxD: jax.Array, weights_NxK: jax.Array) -> jax.Array:
  n, k = weights_NxK.shape
  return jnp.einsum('nkd,nk->nd', y_MxD.reshape(n, k, -1), weights_NxK.astype(y_MxD.dtype))


def experts_local(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                  weights: tuple[jax.Array, ...]) -> jax.Array:
  """sum_k weight_k expert_k(x) for every token, all E experts on this device."""
  k = experts_NxK.shape[1]
  x_MxD = jnp.repeat(x_NxD, k, axis=0)  # Copy m = n K + j is token n for its j-th expert.
  y_MxD = _expert_rows(x_MxD, experts_NxK.reshape(-1), weights, weights[0].shape[0])
  return _mix(y_MxD, weights_NxK)


def experts_exchanged(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                      weights: tuple[jax.Array, ...], *, devices: int,
                      axis: str = EXPERT_AXIS) -> jax.Array:
  """As experts_local, inside shard_map over `axis` of P = `devices`, which holds E / P
  experts per device (global expert e on device e // (E / P)). Token copies go to their
  experts' devices by all-to-all, through each device's experts, and back."""
  n, k = experts_NxK.shape
  per_device = weights[0].shape[0]
  # At most min(K, E / P) of a token's k distinct experts live on one device: C rows per
  # destination hold the worst case, so nothing is dropped.
  c = n * min(k, per_device)
  expert_M = experts_NxK.reshape(-1)
  dest_M = expert_M // per_device
  # Each copy's slot among the copies bound for the same device, in token order.
  onehot_MxP = jax.nn.one_hot(dest_M, devices, dtype=jnp.int32)
  slot_M = jnp.sum((jnp.cumsum(onehot_MxP, axis=0) - 1) * onehot_MxP, axis=1)
  x_MxD = jnp.repeat(x_NxD, k, axis=0)
  send_PxCxD = jnp.zeros((devices, c, x_NxD.shape[1]), x_NxD.dtype).at[dest_M, slot_M].set(x_MxD)
  # Empty slots name expert `per_device`, which _expert_rows leaves at zero.
  send_PxC = jnp.full((devices, c), per_device, jnp.int32).at[dest_M, slot_M].set(
      expert_M % per_device)
  exchange = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0,
                               concat_axis=0, tiled=True)
  recv_PxCxD, recv_PxC = exchange(send_PxCxD), exchange(send_PxC)
  y_RxD = _expert_rows(recv_PxCxD.reshape(devices * c, -1), recv_PxC.reshape(-1), weights,
                       per_device)
  back_PxCxD = exchange(y_RxD.reshape(devices, c, -1))
  return _mix(back_PxCxD[dest_M, slot_M], weights_NxK)


def dense_reference(x_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                    weights: tuple[jax.Array, ...]) -> jax.Array:
  """Every expert on every token, masked by the routing: the plain definition (tests)."""
  w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = weights
  e = w_gate_ExDxF.shape[0]
  mix_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, e, dtype=weights_NxK.dtype)
                    * weights_NxK[..., None], axis=1)
  gate_NxExF = jnp.einsum('nd,edf->nef', x_NxD, w_gate_ExDxF)
  up_NxExF = jnp.einsum('nd,edf->nef', x_NxD, w_up_ExDxF)
  y_NxExD = jnp.einsum('nef,efd->ned', nn.silu(gate_NxExF) * up_NxExF, w_down_ExFxD)
  return jnp.einsum('ned,ne->nd', y_NxExD, mix_NxE.astype(y_NxExD.dtype))


def run_experts(x_BxTxD: jax.Array, r_experts_BxTxK: jax.Array, r_weights_BxTxK: jax.Array,
                weights: tuple[jax.Array, ...], rules: AxisRules | None) -> jax.Array:
  """The routed experts' mixed output for every token: on one device, or per device of
  the mesh (each with its own tokens), exchanging tokens over the expert axis."""
  b, t, d = x_BxTxD.shape
  k = r_experts_BxTxK.shape[-1]

  def local(x, experts, mix, *ws, devices=1):
    bl, tl = x.shape[:2]
    args = (x.reshape(bl * tl, d), experts.reshape(bl * tl, k), mix.reshape(bl * tl, k), ws)
    y = experts_local(*args) if devices == 1 else experts_exchanged(*args, devices=devices)
    return y.reshape(bl, tl, d)

  if rules is None:
    return local(x_BxTxD, r_experts_BxTxK, r_weights_BxTxK, *weights)
  devices = rules.mesh.shape[EXPERT_AXIS]
  rows = rules.spec(('batch', 'length', None), (b, t, k))
  if devices > 1 and EXPERT_AXIS not in _axes(rows[0]):
    # Rows too few to split over the expert axis (the one-row init, a single prompt): one
    # global computation, which the partitioner lays out. Training batches always split
    # (lm/config.py checks batch_size).
    return experts_local(x_BxTxD.reshape(b * t, d), r_experts_BxTxK.reshape(b * t, k),
                         r_weights_BxTxK.reshape(b * t, k), weights).reshape(b, t, d)
  experts_spec = PartitionSpec(EXPERT_AXIS if devices > 1 else None)
  fn = jax.shard_map(functools.partial(local, devices=devices), mesh=rules.mesh,
                     in_specs=(rows, rows, rows) + (experts_spec,) * len(weights),
                     out_specs=rows)
  return fn(x_BxTxD, r_experts_BxTxK, r_weights_BxTxK, *weights)


def _axes(spec_entry: Any) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _expert_init(names: tuple[str, ...], fan_in_axis: int, scale: float = 1.0,
                 zeros: bool = False) -> Callable[..., Any]:
  if zeros:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)
  base = nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal',
                                          in_axis=fan_in_axis, out_axis=-1, batch_axis=(0,))
  return nn.with_logical_partitioning(base, names)


class MoE(nn.Module):
  """Routed SwiGLU experts (plus shared ones): B x T x D -> B x T x D.

  Sows into the `moe_stats` collection, when it is mutable: `counts` (E,), the token
  copies each expert received; `balance` and `router_z`, this layer's unweighted losses.
  """

  cfg: ModelConfig
  rules: AxisRules | None
  deterministic: bool
  shared: Callable[..., nn.Module] | None = None  # Builds the shared experts' MLP.

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c, m = self.cfg, self.cfg.moe
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    e, d, f = m.num_experts, c.d_model, m.width(c.d_ff)
    router_init = nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'), ('embed', None))
    w_router_DxE = self.param('router', router_init, (d, e), pdt)
    bias_E = None
    if m.bias_rate:
      bias_E = self.param(BIAS, nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (None,)), (e,), jnp.float32)
    up_init = _expert_init(('experts', 'embed', 'mlp'), 1)
    down_init = _expert_init(('experts', 'mlp', 'embed'), 1, 1.0 / (2 * c.num_layers),
                             zeros=c.zero_init_out)
    weights = (self.param('gate', up_init, (e, d, f), pdt),
               self.param('up', up_init, (e, d, f), pdt),
               self.param('down', down_init, (e, f, d), pdt))

    b, t, _ = x_BxTxD.shape
    # The router in float32: its choices decide where each token goes.
    logits_NxE = jnp.einsum('nd,de->ne', x_BxTxD.reshape(b * t, d).astype(jnp.float32),
                            jnp.asarray(w_router_DxE, jnp.float32))
    r = route(logits_NxE, m.experts_per_token, m.router, bias_E)
    keep = lambda _, v: v
    self.sow(STATS, 'counts', r.counts_E, init_fn=lambda: 0, reduce_fn=keep)
    self.sow(STATS, 'balance', balance_loss(r), init_fn=lambda: 0, reduce_fn=keep)
    self.sow(STATS, 'router_z', router_z_loss(r), init_fn=lambda: 0, reduce_fn=keep)
    k = m.experts_per_token
    out_BxTxD = run_experts(x_BxTxD, r.experts_NxK.reshape(b, t, k),
                            r.weights_NxK.reshape(b, t, k),
                            tuple(jnp.asarray(w, dt) for w in weights), self.rules)
    out_BxTxD = nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)
    if self.shared is not None:
      out_BxTxD = out_BxTxD + self.shared(name='shared')(x_BxTxD)
    return out_BxTxD


def moe_layers(cfg: ModelConfig) -> tuple[int, ...]:
  """The layers (from 0) that have experts."""
  return tuple(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))


def load_summary(counts_LxE: Any, layers: tuple[int, ...]) -> dict[str, Any]:
  """Log-line fields from token copies per expert (summed over an interval) of each MoE
  layer: `moe_load_I`, the fractions each expert got in layer I, and
  `moe_max_over_mean_I`, the busiest expert's load over the mean (1 = even, E = one
  expert takes all)."""
  counts_LxE = np.asarray(counts_LxE, np.float64)
  out = {}
  for layer, counts_E in zip(layers, counts_LxE, strict=True):
    total = counts_E.sum()
    frac_E = counts_E / total if total else counts_E
    out[f'moe_load_{layer}'] = [round(float(x), 6) for x in frac_E]
    out[f'moe_max_over_mean_{layer}'] = float(frac_E.max() * len(frac_E)) if total else None
  return out


def _sown(sown: Any, name: str) -> list[jax.Array]:
  """Every MoE layer's sown `name` ((L, ...) stacked under scan), in tree order."""
  return [node[name] for node in _layer_nodes(sown)]


def _layer_nodes(tree: Any) -> list[Any]:
  if isinstance(tree, dict) and 'counts' in tree:
    return [tree]
  if isinstance(tree, dict):
    return [n for key in sorted(tree, key=_layer_order) for n in _layer_nodes(tree[key])]
  return []


def _layer_order(key: str) -> tuple[int, str]:
  # block_10 after block_9, as the layers run.
  head, _, num = key.rpartition('_')
  return (int(num), head) if num.isdigit() else (-1, key)


def layer_counts(sown: Any) -> jax.Array:
  """(MoE layers, E): each layer's token copies per expert, in layer order."""
  return jnp.concatenate([c.reshape(-1, c.shape[-1]) for c in _sown(sown, 'counts')])


def add_losses(loss: jax.Array, metrics: dict[str, Any], sown: Any, m: Any
               ) -> tuple[jax.Array, dict[str, Any]]:
  """The loss plus aux_loss x balance + z_loss x router z, summed over the layers; the
  metrics with their means over the layers and the sown tree."""
  balance = jnp.concatenate([b.reshape(-1) for b in _sown(sown, 'balance')])
  router_z = jnp.concatenate([z.reshape(-1) for z in _sown(sown, 'router_z')])
  loss = loss + m.aux_loss * jnp.sum(balance) + m.z_loss * jnp.sum(router_z)
  return loss, {**metrics, 'moe_balance': jax.lax.stop_gradient(jnp.mean(balance)),
                'moe_router_z': jax.lax.stop_gradient(jnp.mean(router_z)),
                STATS: jax.lax.stop_gradient(sown)}


def update_router_bias(params: Any, counts: Any, rate: float) -> Any:
  """DeepSeek-V3's auxiliary-loss-free step: every `router_bias` moves by `rate` towards
  an even load (up for an expert below the mean, down above it), then is re-centred to
  mean 0. `counts`: the `moe_stats` tree's `counts`, summed over the whole batch."""

  def one(path, x):
    if not path or getattr(path[-1], 'key', None) != BIAS:
      return x
    node = counts
    for p in path[:-1]:
      node = node[p.key]
    load = node['counts'].astype(jnp.float32)
    error = jnp.mean(load, axis=-1, keepdims=True) - load
    new = x + rate * jnp.sign(error)
    return new - jnp.mean(new, axis=-1, keepdims=True)

  return jax.tree_util.tree_map_with_path(one, params)
