"""Attention over a sequence split on the mesh's `context` axis (long context).

With mesh.context = n > 1 every row's T tokens are spread over n devices, T / n each,
so no device holds a row whole. Attention is the one layer that mixes tokens; it runs
inside `jax.shard_map` over the mesh, each device with its own queries:

  'ring'       keys and values travel round the devices with `ppermute`, a block per
               step, and each device folds every block into an online (log-sum-exp)
               softmax: no device holds more than one block of scores. The backward
               pass runs the ring again (a custom VJP, as flash and ring attention do),
               the key/value gradients travelling with their block back to its owner.
  'allgather'  every device gathers all keys and values and attends to them at once
               (MaxText's default): simpler, O(T / n x T) scores per device.

The order of a row's tokens on the devices is `sequence_order`'s: 'zigzag' gives
device i the chunks i and 2n - 1 - i of 2n, so under the causal mask every device has
the same work; 'contiguous' gives it chunk i, and the last device does the most.
Each key carries its position in the row and its segment id, so causality and document
boundaries hold whichever device a block comes from. The ring skips a pair of
half-chunks that the causal mask hides whole (`_needed`); `block_work` counts them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lm.mesh import CONTEXT_AXIS
from lm.model.config import CONTEXT_ATTENTIONS, CONTEXT_ORDERS
from lm.sharding import AxisRules

MODES = CONTEXT_ATTENTIONS
ORDERS = CONTEXT_ORDERS
_PARTS = 2  # Each device's chunk is two half-chunks: the unit of work the ring skips.
_MASKED = -1e30  # A finite -inf: exp(_MASKED - max) is 0 without NaNs.
# Keys per score tile inside a block (flash attention's inner loop): a device holds
# (T / 2n) x KEY_TILE scores per head at a time, however long the row.
KEY_TILE = 1024


def sequence_order(t: int, n: int, order: str) -> np.ndarray:
  """The row's positions in the order the devices hold them: device i the i-th T / n."""
  if order == 'contiguous' or n == 1:
    return np.arange(t)
  chunks = np.arange(t).reshape(2 * n, t // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def split(rules: AxisRules | None, t: int) -> int:
  """How many devices share each row of `t` tokens (mesh.context), or 0: rows are not
  split. A row that 2 x mesh.context chunks do not divide (an init on one token, a short
  task row) runs whole, as on one device; training checks seq_len (lm/config.py)."""
  n = rules.mesh.shape.get(CONTEXT_AXIS, 1) if rules is not None else 1
  return n if n > 1 and t % (2 * n) == 0 else 0


@flax.struct.dataclass
class Rows:
  """What attention needs of rows split on the context axis, in the devices' order."""

  index_T: jax.Array  # int32: each token's position in the row.
  segments_BxT: jax.Array  # int32: its document (all 0 without packed documents).

  @classmethod
  def split(cls, order: str, rules: AxisRules, segments_BxT: jax.Array | None,
            *per_token_BxT: jax.Array) -> tuple[Rows, tuple[jax.Array, ...]]:
    """The rows' Rows, and each (B, T) array put in `sequence_order` (`split` > 0)."""
    t = per_token_BxT[0].shape[1]
    perm = sequence_order(t, split(rules, t), order)
    if segments_BxT is None:
      segments_BxT = jnp.zeros(per_token_BxT[0].shape, jnp.int32)
    segments_BxT, *per_token_BxT = (_reorder(x, order, rules, inverse=False)
                                    for x in (segments_BxT, *per_token_BxT))
    return cls(jnp.asarray(perm, jnp.int32), segments_BxT), tuple(per_token_BxT)


def restore(x_BxTx_: jax.Array, order: str, rules: AxisRules) -> jax.Array:
  """Undoes `Rows.split`'s order on axis 1."""
  return _reorder(x_BxTx_, order, rules, inverse=True)


def _reorder(x_BxTx_: jax.Array, order: str, rules: AxisRules, *, inverse: bool) -> jax.Array:
  """Row order -> `sequence_order` on axis 1 (or back), chunk by chunk between the
  devices: an index on the sharded axis would gather whole rows onto every device."""
  if order == 'contiguous':
    return x_BxTx_
  n = rules.mesh.shape[CONTEXT_AXIS]
  holder = lambda c: c if c < n else 2 * n - 1 - c  # noqa: E731  (zigzag's device of chunk c)
  # In row order device j holds chunks 2j and 2j + 1: one even, one odd. So does every
  # device in zigzag order (d and 2n - 1 - d), the even one first where d is even.
  moves = [[(j, holder(2 * j + parity)) for j in range(n)] for parity in (0, 1)]
  if inverse:
    moves = [[(dst, src) for src, dst in pairs] for pairs in moves]

  def local(x):
    first, second = _halves(x, 1)
    even_first = jax.lax.axis_index(CONTEXT_AXIS) % 2 == 0
    if inverse:  # Zigzag in: which half is the even chunk depends on the device.
      first, second = (jnp.where(even_first, first, second),
                       jnp.where(even_first, second, first))
    even, odd = (jax.lax.ppermute(h, CONTEXT_AXIS, pairs)
                 for h, pairs in zip((first, second), moves))
    if inverse:
      return jnp.concatenate([even, odd], axis=1)
    return jnp.where(even_first, jnp.concatenate([even, odd], 1),
                     jnp.concatenate([odd, even], 1))

  spec = P(rules.spec(('batch',), x_BxTx_.shape[:1])[0], CONTEXT_AXIS)
  return jax.shard_map(local, mesh=rules.mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)(x_BxTx_)


def _needed(key_index: Any, query_index: Any) -> Any:
  # Some key of the block comes at or before some query: the causal mask hides not all.
  return key_index.min() <= query_index.max()


def block_work(t: int, n: int, order: str) -> list[int]:
  """Score blocks (half-chunk x half-chunk) each device computes in one ring pass."""
  parts = sequence_order(t, n, order).reshape(n, _PARTS, -1)
  return [sum(bool(_needed(parts[j, b], parts[i, a]))
              for j in range(n) for a in range(_PARTS) for b in range(_PARTS))
          for i in range(n)]


def context_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                      index_T: jax.Array, segments_BxT: jax.Array, *, scale: float,
                      mode: str, rules: AxisRules, key_tile: int = KEY_TILE) -> jax.Array:
  """Causal attention of tokens sharded on `context`; (B, T, N, H) in q's dtype.

  `index_T` is each token's position in the row (the rows are in `sequence_order`),
  `segments_BxT` its document: a query sees the keys at or before it in its document.
  The ring computes scores `key_tile` keys at a time.
  """
  b, _, n_heads, _ = q_BxTxNxH.shape
  kv_heads = k_BxTxKxH.shape[2]
  batch = rules.spec(('batch',), (b,))[0]
  heads = rules.spec(('heads',), (n_heads,))[0]
  if heads != rules.spec(('kv_heads',), (kv_heads,))[0]:
    heads = None  # Query and key heads split alike or not at all: groups stay local.
  q_spec, rows = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)
  local = (functools.partial(_ring, scale=scale, tile=key_tile) if mode == 'ring'
           else functools.partial(_allgather, scale=scale))
  fn = jax.shard_map(local, mesh=rules.mesh,
                     in_specs=(q_spec, q_spec, q_spec, P(CONTEXT_AXIS), rows),
                     out_specs=q_spec, check_vma=False)
  return fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, index_T, segments_BxT)


def _mask(query_index, key_index, query_seg, key_seg):
  """B x 1 x 1 x Tq x Sk: causal within the document."""
  causal = key_index[None, :] <= query_index[:, None]
  same = query_seg[:, :, None] == key_seg[:, None, :]
  return (causal[None] & same)[:, None, None]


def _allgather(q, k, v, index, seg, *, scale):
  gather = functools.partial(jax.lax.all_gather, axis_name=CONTEXT_AXIS, tiled=True)
  k_all, v_all = gather(k, axis=1), gather(v, axis=1)
  mask = _mask(index, gather(index, axis=0), seg, gather(seg, axis=1))[:, 0]
  return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask, scale=scale,
                                      implementation='xla')


def _shift(x):
  """Each device's block to the next device round the ring."""
  n = jax.lax.axis_size(CONTEXT_AXIS)
  return jax.lax.ppermute(x, CONTEXT_AXIS, [(i, (i + 1) % n) for i in range(n)])


def _halves(x, axis):
  return jnp.split(x, _PARTS, axis=axis)


def _block_halves(k, v, index, seg):
  """A key/value block as its half-chunks: (k, v, positions, segments) of each."""
  return list(zip(_halves(k, 1), _halves(v, 1), _halves(index, 0), _halves(seg, 1)))


def _grouped(q_BxTxNxH, kv_heads):
  """(B, T, N, H) -> (B, K, G, T, H) float32: the G query heads of each kv head."""
  b, t, n, h = q_BxTxNxH.shape
  q = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
  return jnp.transpose(q, (0, 2, 3, 1, 4)).astype(jnp.float32)


def _scores(q_a, k_b, mask_ab, scale):
  s = jnp.einsum('bkgth,bskh->bkgts', q_a, k_b.astype(jnp.float32)) * scale
  return jnp.where(mask_ab, s, _MASKED)


def _ring_forward(q, k, v, index, seg, scale, tile):
  """(out (B, K, G, T, H), log-sum-exp (B, K, G, T)) of each query, float32."""
  n = jax.lax.axis_size(CONTEXT_AXIS)
  qs, q_index, q_seg = _halves(q, 3), _halves(index, 0), _halves(seg, 1)
  acc = [(jnp.zeros(qa.shape, jnp.float32), jnp.full(qa.shape[:-1], _MASKED, jnp.float32),
          jnp.zeros(qa.shape[:-1], jnp.float32)) for qa in qs]

  def fold(acc, block):
    halves = _block_halves(*block)
    out = []
    for qa, qi, qg, carry in zip(qs, q_index, q_seg, acc):
      for kb, vb, ki, kg in halves:
        carry = jax.lax.cond(_needed(ki, qi), functools.partial(_fold_one, tile=tile),
                             lambda c, *_: c, carry, qa, qi, qg, (kb, vb, ki, kg), scale)
      out.append(carry)
    return out

  def step(_, state):
    block, acc = state
    nxt = jax.tree.map(_shift, block)  # Sent before the fold, so the two can overlap.
    return nxt, fold(acc, block)

  block, acc = jax.lax.fori_loop(0, n - 1, step, ((k, v, index, seg), acc))
  acc = fold(acc, block)
  out = jnp.concatenate([o / total[..., None] for o, _, total in acc], axis=3)
  lse = jnp.concatenate([m + jnp.log(total) for _, m, total in acc], axis=3)
  return out, lse


def _key_tiles(block, tile):
  """A half-chunk of keys as tiles of `tile` keys stacked on a leading axis, for a scan
  (the half-chunk whole where `tile` does not divide it)."""
  kb, vb, ki, kg = block
  s = ki.shape[0]
  tile = tile if s > tile and s % tile == 0 else s

  def tiled(x, axis):
    x = x.reshape(x.shape[:axis] + (s // tile, tile) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  return tiled(kb, 1), tiled(vb, 1), tiled(ki, 0), tiled(kg, 1)


def _untiled(x_nxBxtx_):
  """Undoes _key_tiles on a per-tile result: (n, B, tile, ...) -> (B, n * tile, ...)."""
  x = jnp.moveaxis(x_nxBxtx_, 0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])


def _fold_one(carry, q_a, qi, qg, block, scale, *, tile):
  """One block into a query half's online softmax (out, running max, running sum),
  a key tile at a time; a tile the causal mask hides whole is skipped."""

  def one(carry, kv):
    k_t, v_t, ki, kg = kv
    return jax.lax.cond(_needed(ki, qi), _fold_tile, lambda c, *_: c, carry, q_a, k_t, v_t,
                        _mask(qi, ki, qg, kg), scale), None

  return jax.lax.scan(one, carry, _key_tiles(block, tile))[0]


def _fold_tile(carry, q_a, k_t, v_t, mask, scale):
  o, m, total = carry
  s = _scores(q_a, k_t, mask, scale)
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  correction = jnp.exp(m - m_new)
  o = o * correction[..., None] + jnp.einsum('bkgts,bskh->bkgth', p, v_t.astype(jnp.float32))
  return o, m_new, total * correction + p.sum(-1)


def _ring_backward(q, k, v, index, seg, out, lse, d_out, scale, tile):
  """(dq, dk, dv) float32, running the ring again: each block's dk, dv go round with it."""
  n = jax.lax.axis_size(CONTEXT_AXIS)
  delta = jnp.sum(d_out * out, -1)  # (B, K, G, T): the softmax's backward term.
  qs, q_index, q_seg = _halves(q, 3), _halves(index, 0), _halves(seg, 1)
  lses, d_outs, deltas = _halves(lse, 3), _halves(d_out, 3), _halves(delta, 3)

  def step(_, state):
    (k, v, k_index, k_seg, dk, dv), dq = state
    dq, dks, dvs = list(dq), _halves(dk, 1), _halves(dv, 1)
    halves = _block_halves(k, v, k_index, k_seg)
    for a, (qa, qi, qg) in enumerate(zip(qs, q_index, q_seg)):
      for b_, (kb, vb, ki, kg) in enumerate(halves):
        grads = (dq[a], dks[b_], dvs[b_])
        dq[a], dks[b_], dvs[b_] = jax.lax.cond(
            _needed(ki, qi), functools.partial(_grad_one, tile=tile), lambda g, *_: g, grads,
            qa, qi, qg, (kb, vb, ki, kg), (lses[a], d_outs[a], deltas[a]), scale)
    block = (k, v, k_index, k_seg, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1))
    return jax.tree.map(_shift, block), tuple(dq)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  block = (k, v, index, seg, zeros(k), zeros(v))
  block, dq = jax.lax.fori_loop(0, n, step, (block, tuple(zeros(qa) for qa in qs)))
  return jnp.concatenate(dq, axis=3), block[4], block[5]


def _grad_one(grads, q_a, qi, qg, block, softmax, scale, *, tile):
  """One block's share of (dq, dk, dv), a key tile at a time as in _fold_one."""
  dq, dk, dv = grads

  def one(dq, kv):
    k_t, v_t, ki, kg = kv
    zero = (dq, jnp.zeros(k_t.shape, jnp.float32), jnp.zeros(v_t.shape, jnp.float32))
    dq, dk_t, dv_t = jax.lax.cond(_needed(ki, qi), _grad_tile, lambda *_: zero, dq, q_a, k_t,
                                  v_t, _mask(qi, ki, qg, kg), softmax, scale)
    return dq, (dk_t, dv_t)

  dq, (dk_t, dv_t) = jax.lax.scan(one, dq, _key_tiles(block, tile))
  return dq, dk + _untiled(dk_t), dv + _untiled(dv_t)


def _grad_tile(dq, q_a, k_t, v_t, mask, softmax, scale):
  lse_a, d_out_a, delta_a = softmax
  p = jnp.where(mask, jnp.exp(_scores(q_a, k_t, mask, scale) - lse_a[..., None]), 0.0)
  dv = jnp.einsum('bkgts,bkgth->bskh', p, d_out_a)
  dp = jnp.einsum('bkgth,bskh->bkgts', d_out_a, v_t.astype(jnp.float32))
  ds = p * (dp - delta_a[..., None]) * scale
  dq = dq + jnp.einsum('bkgts,bskh->bkgth', ds, k_t.astype(jnp.float32))
  return dq, jnp.einsum('bkgts,bkgth->bskh', ds, q_a), dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_grouped(q, k, v, index, seg, scale, tile):
  return _ring_forward(q, k, v, index, seg, scale, tile)[0]


def _ring_fwd(q, k, v, index, seg, scale, tile):
  out, lse = _ring_forward(q, k, v, index, seg, scale, tile)
  return out, (q, k, v, index, seg, out, lse)


def _ring_bwd(scale, tile, residuals, d_out):
  q, k, v, index, seg, out, lse = residuals
  dq, dk, dv = _ring_backward(q, k, v, index, seg, out, lse, d_out, scale, tile)
  return (dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_ring_grouped.defvjp(_ring_fwd, _ring_bwd)


def _ring(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, index_T, seg_BxT, *, scale, tile):
  """One device's queries against every block of the ring: (B, T, N, H) in q's dtype."""
  b, t, n, h = q_BxTxNxH.shape
  out = _ring_grouped(_grouped(q_BxTxNxH, k_BxTxKxH.shape[2]), k_BxTxKxH, v_BxTxKxH,
                      index_T, seg_BxT, scale, tile)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q_BxTxNxH.dtype)
