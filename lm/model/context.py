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

import dataclasses
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
  # Some key of the block (each row of key_index's last axis) comes at or before some
  # query: the causal mask hides not all.
  return key_index.min(-1) <= query_index.max()


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
  if mode == 'ring':
    ring = _Ring(rules.mesh, batch, heads, scale, key_tile)
    return _ring_attention(ring, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, index_T, segments_BxT)
  tokens, rows = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)
  fn = jax.shard_map(functools.partial(_allgather, scale=scale), mesh=rules.mesh,
                     in_specs=(tokens, tokens, tokens, P(CONTEXT_AXIS), rows),
                     out_specs=tokens, check_vma=False)
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


def _loop(n, body, init):
  """body(i, x) for i in range(n) as a while loop, `n` static or traced. Not fori_loop:
  with a static length it is a scan, and under the scanned layers JAX then kept every
  step's temporaries (each score tile) for a backward pass that never reads them."""
  def step(state):
    i, x = state
    return i + 1, body(i, x)

  return jax.lax.while_loop(lambda state: state[0] < n, step, (jnp.int32(0), init))[1]


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
      for half in halves:
        carry = _fold_half(carry, qa, qi, qg, half, scale, tile)
      out.append(carry)
    return out

  def step(_, state):
    block, acc = state
    nxt = jax.tree.map(_shift, block)  # Sent before the fold, so the two can overlap.
    return nxt, fold(acc, block)

  block, acc = _loop(n - 1, step, ((k, v, index, seg), acc))
  acc = fold(acc, block)
  out = jnp.concatenate([o / total[..., None] for o, _, total in acc], axis=3)
  lse = jnp.concatenate([m + jnp.log(total) for _, m, total in acc], axis=3)
  return out, lse


def _tiles(half, query_index, tile):
  """(tile length, how many tiles of the key half-chunk some query sees, a function
  giving tile i). A half-chunk's positions ascend, so the tiles seen are a prefix, and
  none at all where the causal mask hides the half-chunk whole (`_needed`)."""
  key_index = half[2]
  s = key_index.shape[0]
  t = tile if s > tile and s % tile == 0 else s
  seen = jnp.sum(_needed(key_index.reshape(-1, t), query_index))

  def tile_i(i):
    return tuple(jax.lax.dynamic_slice_in_dim(x, i * t, t, axis)
                 for x, axis in zip(half, (1, 1, 0, 1)))

  return t, seen, tile_i


def _fold_half(carry, q_a, qi, qg, half, scale, tile):
  """A key half-chunk into a query half's online softmax (out, running max, running
  sum), a tile of keys at a time."""
  _, seen, tile_i = _tiles(half, qi, tile)

  def one(i, carry):
    k_t, v_t, ki, kg = tile_i(i)
    return _fold_tile(carry, q_a, k_t, v_t, _mask(qi, ki, qg, kg), scale)

  return _loop(seen, one, carry)


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
      for b_, half in enumerate(halves):
        dq[a], dks[b_], dvs[b_] = _grad_half((dq[a], dks[b_], dvs[b_]), qa, qi, qg, half,
                                             (lses[a], d_outs[a], deltas[a]), scale, tile)
    block = (k, v, k_index, k_seg, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1))
    return jax.tree.map(_shift, block), tuple(dq)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  block = (k, v, index, seg, zeros(k), zeros(v))
  block, dq = _loop(n, step, (block, tuple(zeros(qa) for qa in qs)))
  return jnp.concatenate(dq, axis=3), block[4], block[5]


def _grad_half(grads, q_a, qi, qg, half, softmax, scale, tile):
  """A key half-chunk's share of (dq, dk, dv), a tile at a time as in _fold_half."""
  t, seen, tile_i = _tiles(half, qi, tile)

  def one(i, grads):
    dq, dk, dv = grads
    k_t, v_t, ki, kg = tile_i(i)
    dq, dk_t, dv_t = _grad_tile(dq, q_a, k_t, v_t, _mask(qi, ki, qg, kg), softmax, scale)
    add = lambda acc, d: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, jax.lax.dynamic_slice_in_dim(acc, i * t, t, 1) + d, i * t, 1)
    return dq, add(dk, dk_t), add(dv, dv_t)

  return _loop(seen, one, grads)


def _grad_tile(dq, q_a, k_t, v_t, mask, softmax, scale):
  lse_a, d_out_a, delta_a = softmax
  p = jnp.where(mask, jnp.exp(_scores(q_a, k_t, mask, scale) - lse_a[..., None]), 0.0)
  dv = jnp.einsum('bkgts,bkgth->bskh', p, d_out_a)
  dp = jnp.einsum('bkgth,bskh->bkgts', d_out_a, v_t.astype(jnp.float32))
  ds = p * (dp - delta_a[..., None]) * scale
  dq = dq + jnp.einsum('bkgts,bskh->bkgth', ds, k_t.astype(jnp.float32))
  return dq, jnp.einsum('bkgts,bkgth->bskh', ds, q_a), dv


@dataclasses.dataclass(frozen=True)
class _Ring:
  """The ring's two passes, each one `shard_map` over the mesh. The custom VJP sits
  outside them: inside a shard_map under a scan (scan_layers) JAX differentiated the
  forward ring itself and kept every score tile for the backward pass."""

  mesh: jax.sharding.Mesh
  batch: Any  # The mesh axes of the batch, and of the heads (None: not split).
  heads: Any
  scale: float
  tile: int

  def _map(self, local, in_specs, out_specs):
    return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  @property
  def _specs(self):
    tokens = P(self.batch, CONTEXT_AXIS, self.heads, None)  # (B, T, N, H)
    grouped = P(self.batch, self.heads, None, CONTEXT_AXIS)  # (B, K, G, T, ...)
    return tokens, grouped, (tokens, tokens, tokens, P(CONTEXT_AXIS), P(self.batch,
                                                                          CONTEXT_AXIS))

  def forward(self, q, k, v, index, seg):
    """(out (B, T, N, H) in q's dtype, (out, log-sum-exp) float32 grouped)."""
    tokens, grouped, inputs = self._specs

    def local(q, k, v, index, seg):
      out, lse = _ring_forward(_grouped(q, k.shape[2]), k, v, index, seg, self.scale,
                               self.tile)
      return _ungrouped(out).astype(q.dtype), out, lse

    return self._map(local, inputs, (tokens, grouped, grouped))(q, k, v, index, seg)

  def backward(self, q, k, v, index, seg, out, lse, d_out):
    tokens, grouped, inputs = self._specs

    def local(q, k, v, index, seg, out, lse, d_out):
      kv_heads = k.shape[2]
      dq, dk, dv = _ring_backward(_grouped(q, kv_heads), k, v, index, seg, out, lse,
                                  _grouped(d_out, kv_heads), self.scale, self.tile)
      return _ungrouped(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return self._map(local, (*inputs, grouped, grouped, tokens), (tokens,) * 3)(
        q, k, v, index, seg, out, lse, d_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring, q, k, v, index, seg):
  return ring.forward(q, k, v, index, seg)[0]


def _ring_fwd(ring, q, k, v, index, seg):
  out, grouped_out, lse = ring.forward(q, k, v, index, seg)
  return out, (q, k, v, index, seg, grouped_out, lse)


def _ring_bwd(ring, residuals, d_out):
  return (*ring.backward(*residuals, d_out), None, None)


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


def _ungrouped(x_BxKxGxTxH):
  """Undoes _grouped: (B, K, G, T, H) -> (B, T, N, H)."""
  b, k, g, t, h = x_BxKxGxTxH.shape
  return jnp.transpose(x_BxKxGxTxH, (0, 3, 1, 2, 4)).reshape(b, t, k * g, h)
