"""Next-token cross-entropy in float32, whole or in chunks over each row's tokens.

The output head is the largest activation of a small model: B x T x V logits, which in
float32 are 6.6 GB for GPT-2 small at batch 32 x 1024. The chunked loss never builds
them: it computes the head, the softmax statistics and the gradient one chunk of
`chunk` tokens per row at a time. Its gradient is formed in the same pass (the softmax
minus the one-hot targets, times the head), so nothing is recomputed in the backward
pass and the FLOPs equal the unchunked loss's. With a logit soft-cap (`softcap`, the
model's `logit_softcap`) the capped logits are scored and the gradient passes through
the cap's derivative, 1 - tanh^2.

Shapes as in lm/model/transformer.py: B batch, T length, C chunk length, D d_model, V vocab.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm.model.transformer import softcap as apply_softcap
from lm.sharding import AxisRules, constrain

Metrics = dict[str, jax.Array]


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, z_loss: float = 0.0,
                  weights_BxT: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Mean next-token cross-entropy in float32, plus z_loss · mean(log Z ^ 2).

  `weights_BxT`: a weighted sum instead of the mean (fine-tuning's loss mask, divided by
  the number of trained tokens: see loss_weights).
  """
  nll_BxT, log_z_BxT = token_nll(logits_BxTxV, targets_BxT)
  if weights_BxT is None:
    nll, z = jnp.mean(nll_BxT), jnp.mean(jnp.square(log_z_BxT))
  else:
    nll, z = jnp.sum(nll_BxT * weights_BxT), jnp.sum(jnp.square(log_z_BxT) * weights_BxT)
  return nll + z_loss * z, {'loss': nll, 'z_loss': z}


def loss_weights(mask_BxT: jax.Array, scale: float = 1.0) -> jax.Array:
  """float32 weights: the mask over its sum, times `scale`, so a weighted sum is the mean
  over the masked tokens (scale = micro-batches: their mean is the whole batch's)."""
  mask = mask_BxT.astype(jnp.float32)
  return mask * (scale / jnp.maximum(jnp.sum(mask), 1.0))


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and log Z, both float32 B x T."""
  logits = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return log_z_BxT - target_BxT, log_z_BxT


def chunk_length(length: int, chunk: int) -> int:
  """The largest divisor of `length` that is at most `chunk` (0: the whole row)."""
  if chunk <= 0 or chunk >= length:
    return length
  return max(c for c in range(1, chunk + 1) if length % c == 0)


def _length_shards(rules: AxisRules | None, b: int, t: int) -> int:
  """The devices each row's tokens are split over (mesh.context), 1 for whole rows."""
  if rules is None:
    return 1
  axes = rules.spec(('batch', 'length'), (b, t))[1] or ()
  return math.prod(rules.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _chunks(x_BxTx_: jax.Array, c: int, p: int = 1) -> jax.Array:
  """B x T x ... -> (T / (P C)) x B x (P C) x ...: chunks along the rows, batch sharding
  intact. With rows split over P devices, each step takes C tokens of every device's
  share, so the scan never slices across devices."""
  b, t = x_BxTx_.shape[:2]
  rest = x_BxTx_.shape[2:]
  x = jnp.moveaxis(x_BxTx_.reshape(b, p, t // (p * c), c, *rest), 2, 0)
  return x.reshape(t // (p * c), b, p * c, *rest)


def _unchunk(x_NxBxC: jax.Array, p: int = 1) -> jax.Array:
  n, b, pc = x_NxBxC.shape[:3]
  rest = x_NxBxC.shape[3:]
  x = jnp.moveaxis(x_NxBxC.reshape(n, b, p, pc // p, *rest), 0, 2)
  return x.reshape(b, n * pc, *rest)


def _chunk_logits(x_BxCxD: jax.Array, head_DxV: jax.Array) -> jax.Array:
  # bf16 (or whatever the compute dtype is) inputs, float32 accumulation and result.
  return jnp.einsum('bcd,dv->bcv', x_BxCxD, head_DxV, preferred_element_type=jnp.float32)


def chunked_token_nll(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array,
                      chunk: int, rules: AxisRules | None = None, softcap: float = 0.0
                      ) -> tuple[jax.Array, jax.Array]:
  """`token_nll(softcap(x @ head), targets)` without the B x T x V logits (no gradient:
  eval)."""
  b, t, _ = x_BxTxD.shape
  p = _length_shards(rules, b, t)
  c = chunk_length(t // p, chunk)
  head_DxV = constrain(head_DxV, (None, 'vocab'), rules)  # Gathered once, not per chunk.

  def one(_, xs):
    x_BxCxD, t_BxC = xs
    return None, token_nll(apply_softcap(_chunk_logits(x_BxCxD, head_DxV), softcap), t_BxC)

  _, (nll, log_z) = jax.lax.scan(one, None,
                                 (_chunks(x_BxTxD, c, p), _chunks(targets_BxT, c, p)))
  return _unchunk(nll, p), _unchunk(log_z, p)


def chunked_cross_entropy(x_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array,
                          *, chunk: int, z_loss: float = 0.0,
                          rules: AxisRules | None = None,
                          weights_BxT: jax.Array | None = None,
                          softcap: float = 0.0) -> tuple[jax.Array, Metrics]:
  """`cross_entropy(softcap(x @ head), targets, z_loss, weights)`, chunked;
  differentiable in x and head.

  `rules`: the mesh the batch is split over. Each batch shard then sums its own part of
  the head's gradient over the chunks, and the shards are summed once at the end: one
  all-reduce per (micro-)batch, as for the unchunked loss, not one per chunk. The
  accumulator costs each device a float32 D x V (over tensor) array.
  """
  total, nll, z = _fused(x_BxTxD, head_DxV, targets_BxT, weights_BxT, chunk, z_loss, rules,
                         float(softcap))
  return total, {'loss': jax.lax.stop_gradient(nll), 'z_loss': jax.lax.stop_gradient(z)}


def _batch_shards(rules: AxisRules | None, b: int) -> int:
  if rules is None:
    return 1
  axes = rules.spec(('batch',), (b,))[0] or ()
  return math.prod(rules.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x_BxTxD, head_DxV, targets_BxT, weights_BxT, chunk, z_loss, rules, softcap):
  """(loss, mean NLL, mean log Z ^ 2). Only the first output carries a gradient."""
  return _fused_fwd(x_BxTxD, head_DxV, targets_BxT, weights_BxT, chunk, z_loss, rules,
                    softcap)[0]


def _fused_fwd(x_BxTxD, head_DxV, targets_BxT, weights_BxT, chunk, z_loss, rules, softcap):
  b, t, _ = x_BxTxD.shape
  p = _length_shards(rules, b, t)
  c = chunk_length(t // p, chunk)
  s = _batch_shards(rules, b)  # S x P: the head gradient is kept per batch and row shard.
  scale = 1.0 / (b * t)  # Without weights every token weighs the same in the mean.
  # FSDP's gather of the head, once here rather than once per chunk inside the loop.
  head_DxV = constrain(head_DxV, (None, 'vocab'), rules)

  def per_shard(a_BxCx_):
    return a_BxCx_.reshape(s, b // s, p, c, *a_BxCx_.shape[2:])

  def one(d_head_SxPxDxV, xs):
    x_BxCxD, t_BxC, *w_BxC = xs
    logits_BxCxV = _chunk_logits(x_BxCxD, head_DxV)
    if softcap:
      tanh_BxCxV = jnp.tanh(logits_BxCxV / softcap)
      logits_BxCxV = softcap * tanh_BxCxV
    nll_BxC, log_z_BxC = token_nll(logits_BxCxV, t_BxC)
    # d loss / d logits: softmax - one-hot for the NLL, 2 z_loss log Z softmax for the
    # z-loss, each over B·T tokens.
    p_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
    g_BxCxV = p_BxCxV * (1.0 + 2.0 * z_loss * log_z_BxC)[..., None]
    g_BxCxV = g_BxCxV - jax.nn.one_hot(t_BxC, g_BxCxV.shape[-1], dtype=jnp.float32)
    g_BxCxV = g_BxCxV * (w_BxC[0][..., None] if w_BxC else scale)
    if softcap:  # Through the cap: d (cap tanh(u / cap)) / du = 1 - tanh^2.
      g_BxCxV = g_BxCxV * (1.0 - jnp.square(tanh_BxCxV))
    g_BxCxV = g_BxCxV.astype(x_BxCxD.dtype)
    dx_BxCxD = jnp.einsum('bcv,dv->bcd', g_BxCxV, head_DxV,
                          preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
    d_head_SxPxDxV += jnp.einsum('sbpcd,sbpcv->spdv', per_shard(x_BxCxD),
                                 per_shard(g_BxCxV), preferred_element_type=jnp.float32)
    return _head_shards(d_head_SxPxDxV, rules), (nll_BxC, log_z_BxC, dx_BxCxD)

  d_head = _head_shards(jnp.zeros((s, p, *head_DxV.shape), jnp.float32), rules)
  d_head, (nll, log_z, dx) = jax.lax.scan(
      one, d_head, (_chunks(x_BxTxD, c, p), _chunks(targets_BxT, c, p),
                    *([] if weights_BxT is None else [_chunks(weights_BxT, c, p)])))
  d_head = jnp.sum(d_head, axis=(0, 1))
  if weights_BxT is None:
    nll_mean, z_mean = jnp.mean(nll), jnp.mean(jnp.square(log_z))
  else:  # nll and log_z are chunk-major: (T / C) x B x C.
    w_NxBxC = _chunks(weights_BxT, c, p)
    nll_mean, z_mean = jnp.sum(nll * w_NxBxC), jnp.sum(jnp.square(log_z) * w_NxBxC)
  dx_BxTxD = _unchunk(dx, p)
  out = (nll_mean + z_loss * z_mean, nll_mean, z_mean)
  d_weights = None if weights_BxT is None else jnp.zeros_like(weights_BxT)
  return out, (dx_BxTxD, d_head.astype(head_DxV.dtype), d_weights)


def _head_shards(d_head_SxPxDxV: jax.Array, rules: AxisRules | None) -> jax.Array:
  return constrain(d_head_SxPxDxV, ('batch', 'length', 'embed', 'vocab'), rules)


def _fused_bwd(chunk, z_loss, rules, softcap, residuals, cotangents):
  del chunk, z_loss, rules, softcap
  dx_BxTxD, d_head_DxV, d_weights = residuals  # The weights are data: no gradient.
  g = cotangents[0]  # The metrics' cotangents are ignored: they are not differentiated.
  return ((g * dx_BxTxD).astype(dx_BxTxD.dtype), (g * d_head_DxV).astype(d_head_DxV.dtype),
          None, d_weights)


_fused.defvjp(_fused_fwd, _fused_bwd)
