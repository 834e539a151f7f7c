"""A mixture of experts in place of the MLP: a router sends each token to k of E SwiGLU
experts and mixes their outputs (`model.moe.*`, lm/model/config.py MoEConfig).

This module routes, balances and keeps the statistics; lm/model/experts.py runs the
tokens through their experts: dropless by default, grouped matmuls
(`jax.lax.ragged_dot`) or fixed buffers, on one device or exchanged over the `expert`
mesh axis by `jax.lax.all_to_all` inside `jax.shard_map`.

Load balancing, each optional: the Switch / GShard loss E * sum_e f_e P_e (f the
fraction of token copies expert e receives, P its mean router probability), the router
z-loss, and DeepSeek-V3's bias: a per-expert `router_bias` parameter added to the scores
for selection only, which no gradient moves; the train step nudges it against the load
error (`update_router_bias`).

Shapes: N tokens, E experts, K experts per token, D d_model, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.model import experts
from lm.model.config import ModelConfig
from lm.model.initializers import dense_init
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
    up_init = dense_init(('experts', 'embed', 'mlp'), (1,))
    down_init = dense_init(('experts', 'mlp', 'embed'), (1,), 1.0 / (2 * c.num_layers),
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
    out_BxTxD, dropped = experts.run_experts(
        x_BxTxD, r.experts_NxK.reshape(b, t, k), r.weights_NxK.reshape(b, t, k),
        tuple(jnp.asarray(w, dt) for w in weights), self.rules,
        experts.Dispatch(m.impl, m.capacity_factor))
    self.sow(STATS, 'dropped', jax.lax.stop_gradient(dropped), init_fn=lambda: 0,
             reduce_fn=keep)
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
  dropped = sum(jnp.sum(x) for x in _sown(sown, 'dropped'))
  copies = sum(jnp.sum(x) for x in _sown(sown, 'counts'))
  loss = loss + m.aux_loss * jnp.sum(balance) + m.z_loss * jnp.sum(router_z)
  return loss, {**metrics, 'moe_balance': jax.lax.stop_gradient(jnp.mean(balance)),
                'moe_router_z': jax.lax.stop_gradient(jnp.mean(router_z)),
                'moe_dropped': dropped / copies, STATS: jax.lax.stop_gradient(sown)}


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
