"""A Llama-style decoder-only Transformer in Flax Linen.

Pre-RMSNorm blocks of causal self-attention (RoPE, grouped-query heads) and a SwiGLU MLP.
Architecture switches, each off by default: RMSNorm on queries and keys (`qk_norm`), a
ReLU-squared MLP (`mlp='relu2'`), zero-initialised output projections (`zero_init_out`)
and tanh soft-capped logits (`logit_softcap`); muP width transfer (`mup_base_width`,
lm/model/mup.py) scales the attention logits, the head's init and the logits.
Tensor names carry their shapes so each einsum can be checked by eye:
  B batch, T length (queries), S length (keys), D d_model, N query heads, K kv heads,
  G = N // K query heads per kv head, H head_dim, F d_ff, V vocab, L layers.
Every parameter and main activation carries logical axis names; `lm/sharding.py` maps
them onto the mesh.

Packed rows may carry `segment_ids` (which document each token belongs to): attention
then stays inside a document and RoPE positions restart at each document's first token.

`decode=True` runs the same parameters incrementally for sampling: keys and values live
in a fixed-size `cache` collection (S slots), each call writes its T new tokens at the
cache index, and attention reads the cache under a mask of the slots filled so far.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model import context, moe, mup
from lm.model.config import ModelConfig
from lm.model.initializers import dense_init, init
from lm.model.positions import rope, rope_frequencies, segment_positions
from lm.sharding import AxisRules, constrain

KERNEL_INPUTS = 'kernel_inputs'  # The sown collection of projection inputs.


class RMSNorm(nn.Module):
  """RMSNorm over the last axis (D, or H for the query and key norms: `axis` names it)."""

  eps: float
  dtype: Any
  param_dtype: Any
  axis: str = 'embed'

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param('scale', init((self.axis,), ones=True), (x_BxTxD.shape[-1],),
                         self.param_dtype)
    # Statistics in float32: bf16 mean-of-squares loses too much precision.
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """B x 1 x T x S: query t may attend to key s of the same segment (causality apart)."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def attention_impl(setting: str, dtype: Any) -> str | None:
  """cuDNN flash attention where it applies (GPU, 16-bit), XLA otherwise."""
  if setting != 'auto':
    return setting
  on_gpu = jax.default_backend() == 'gpu'
  return 'cudnn' if on_gpu and jnp.dtype(dtype).itemsize == 2 else 'xla'


@flax.struct.dataclass
class DecodeState:
  """What every layer needs to read and write its cache in one decode call."""

  # int32: the cache slot of the first of the T new tokens; a scalar when every row
  # writes the same slot (one batch of prompts), one per row (B) when rows advance on
  # their own (a server's decode slots, lm/serve/engine.py).
  index: jax.Array
  mask_Bx1xTxS: jax.Array  # bool: query t may attend to cache slot s.


def decode_mask(positions_BxS: jax.Array, index: jax.Array, t: int) -> jax.Array:
  """Which filled cache slots each of the T new tokens attends to: B x 1 x T x S.

  Slots hold tokens in order, so causality is `slot <= the query's slot`; a negative
  position marks padding (left-padded prompts), which nothing attends to. Each token
  still sees its own slot, so no row is empty and padding rows stay finite.
  """
  slot_S = jnp.arange(positions_BxS.shape[1])
  query_slot_RxT = jnp.reshape(index, (-1, 1)) + jnp.arange(t)  # R = 1 or B rows.
  causal_RxTxS = slot_S <= query_slot_RxT[..., None]
  own_RxTxS = slot_S == query_slot_RxT[..., None]
  real_BxS = positions_BxS >= 0
  mask_BxTxS = (causal_RxTxS & real_BxS[:, None, :]) | own_RxTxS
  return mask_BxTxS[:, None]


def write_slots(slots_BxS: jax.Array, new_BxT: jax.Array, index: jax.Array) -> jax.Array:
  """`new` written into `slots` (along axis 1) from slot `index`: a scalar, or one per row."""
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(slots_BxS, new_BxT, index, axis=1)
  row = lambda s, n, i: jax.lax.dynamic_update_slice_in_dim(s, n, i, axis=0)  # noqa: E731
  return jax.vmap(row)(slots_BxS, new_BxT, index)


class Attention(nn.Module):
  cfg: ModelConfig
  rules: AxisRules | None
  deterministic: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               cache: DecodeState | None = None, mask_Bx1xTxS: jax.Array | None = None,
               rows: context.Rows | None = None) -> jax.Array:
    c = self.cfg
    D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_size
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    q_init = dense_init(('embed', 'heads', 'head_dim'), (0,))
    kv_init = dense_init(('embed', 'kv_heads', 'head_dim'), (0,))
    w_q_DxNxH = self.param('q', q_init, (D, N, H), pdt)
    w_k_DxKxH = self.param('k', kv_init, (D, K, H), pdt)
    w_v_DxKxH = self.param('v', kv_init, (D, K, H), pdt)
    # Output projections start small (or at zero) so each residual branch begins near
    # identity.
    out_scale = 1.0 / (2 * c.num_layers)
    o_init = dense_init(('heads', 'head_dim', 'embed'), (0, 1), out_scale,
                         zeros=c.zero_init_out)
    w_o_NxHxD = self.param('o', o_init, (N, H, D), pdt)

    # What each projection reads, for pruning's calibration (lm/compress/); sow is a
    # no-op unless the collection is made mutable, so training and decoding never keep it.
    self.sow(KERNEL_INPUTS, 'qkv', x_BxTxD)
    q_BxTxNxH = jnp.einsum('btd,dnh->btnh', x_BxTxD, jnp.asarray(w_q_DxNxH, dt))
    k_BxSxKxH = jnp.einsum('bsd,dkh->bskh', x_BxTxD, jnp.asarray(w_k_DxKxH, dt))
    v_BxSxKxH = jnp.einsum('bsd,dkh->bskh', x_BxTxD, jnp.asarray(w_v_DxKxH, dt))
    q_BxTxNxH = constrain(q_BxTxNxH, ('batch', 'length', 'heads', 'head_dim'), self.rules)
    k_BxSxKxH = constrain(k_BxSxKxH, ('batch', 'length', 'kv_heads', 'head_dim'), self.rules)
    v_BxSxKxH = constrain(v_BxSxKxH, ('batch', 'length', 'kv_heads', 'head_dim'), self.rules)
    if c.qk_norm:
      # Each head's query and key to unit RMS times a learned gain (one per H, shared by
      # the heads), before RoPE: bounds the attention logits.
      norm = functools.partial(RMSNorm, c.norm_eps, dt, pdt, 'head_dim')
      q_BxTxNxH = norm(name='q_norm')(q_BxTxNxH)
      k_BxSxKxH = norm(name='k_norm')(k_BxSxKxH)
    freq_h = rope_frequencies(c)
    q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, freq_h)
    k_BxSxKxH = rope(k_BxSxKxH, positions_BxT, freq_h)

    # Grouped-query attention is native here: K kv heads serve N query heads.
    if rows is not None:  # The sequence is split on the mesh's context axis.
      out_BxTxNxH = context.context_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, rows.index_T, rows.segments_BxT,
          scale=mup.attention_scale(c) or H ** -0.5, mode=c.context_attention, rules=self.rules)
    elif self.decode:
      k_BxSxKxH = self._cached('k', k_BxSxKxH, cache.index)
      v_BxSxKxH = self._cached('v', v_BxSxKxH, cache.index)
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=cache.mask_Bx1xTxS,
          scale=mup.attention_scale(c), implementation='xla')
    else:
      # A segment mask is combined with causality by either implementation (cuDNN turns
      # it into an additive bias).
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, is_causal=True,
          scale=mup.attention_scale(c), implementation=attention_impl(c.attention, dt))
    out_BxTxNxH = constrain(out_BxTxNxH, ('batch', 'length', 'heads', 'head_dim'), self.rules)
    self.sow(KERNEL_INPUTS, 'o', out_BxTxNxH)
    out_BxTxD = jnp.einsum('btnh,nhd->btd', out_BxTxNxH, jnp.asarray(w_o_NxHxD, dt))
    return nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)

  def _cached(self, name: str, new_BxTxKxH: jax.Array, index: jax.Array) -> jax.Array:
    """Writes the T new keys (or values) at slot `index`; returns all S slots.

    The cache is created at init with the length of the init input: that is S.
    """
    slots = self.variable('cache', name, jnp.zeros, new_BxTxKxH.shape, new_BxTxKxH.dtype)
    slots.value = write_slots(slots.value, new_BxTxKxH, index)
    return slots.value


class MLP(nn.Module):
  """SwiGLU: silu(x gate) * (x up) down; or ReLU-squared (`mlp='relu2'`): relu(x up)^2 down."""

  cfg: ModelConfig
  rules: AxisRules | None
  deterministic: bool
  d_ff: int = 0  # The hidden width F; 0 = cfg.d_ff (MoE's shared experts set their own).

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c = self.cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    f = self.d_ff or c.d_ff
    if c.mlp == 'swiglu':
      w_gate_DxF = self.param('gate', dense_init(('embed', 'mlp'), (0,)), (c.d_model, f), pdt)
    w_up_DxF = self.param('up', dense_init(('embed', 'mlp'), (0,)), (c.d_model, f), pdt)
    down_init = dense_init(('mlp', 'embed'), (0,), 1.0 / (2 * c.num_layers),
                            zeros=c.zero_init_out)
    w_down_FxD = self.param('down', down_init, (f, c.d_model), pdt)
    # Batch and length folded into one axis (B*T, a bitcast): with 3-D activations XLA's
    # CPU backend transposes SwiGLU's gate gradient through a slow loop, which made the
    # MLP's backward pass twice as long. Same math and sharding (batch stays major), but
    # only while the rows are whole: B*T split over batch and length axes at once is no
    # sharding, and the partitioner would gather every row onto each device.
    b, t, d = x_BxTxD.shape
    whole_rows = self.rules is None or self.rules.spec(('batch', 'length'), (b, t))[1] is None
    x_NxD = x_BxTxD.reshape(b * t, d) if whole_rows else x_BxTxD
    self.sow(KERNEL_INPUTS, 'up', x_BxTxD)  # And gate's.
    up_NxF = jnp.einsum('...d,df->...f', x_NxD, jnp.asarray(w_up_DxF, dt))
    if c.mlp == 'swiglu':
      gate_NxF = jnp.einsum('...d,df->...f', x_NxD, jnp.asarray(w_gate_DxF, dt))
      h_NxF = nn.silu(gate_NxF) * up_NxF
    else:
      h_NxF = jnp.square(nn.relu(up_NxF))
    h_BxTxF = constrain(h_NxF.reshape(b, t, -1), ('batch', 'length', 'mlp'), self.rules)
    self.sow(KERNEL_INPUTS, 'down', h_BxTxF)
    out_BxTxD = jnp.einsum('btf,fd->btd', h_BxTxF, jnp.asarray(w_down_FxD, dt))
    return nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)


class Block(nn.Module):
  cfg: ModelConfig
  rules: AxisRules | None
  deterministic: bool
  decode: bool = False
  experts: bool = False  # A mixture of experts (lm/model/moe.py) in place of the MLP.

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               cache: DecodeState | None = None, mask_Bx1xTxS: jax.Array | None = None,
               rows: context.Rows | None = None):
    c = self.cfg
    norm = functools.partial(RMSNorm, c.norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
    h = norm(name='attn_norm')(x_BxTxD)
    attn = Attention(c, self.rules, self.deterministic, self.decode, name='attn')
    x_BxTxD = x_BxTxD + attn(h, positions_BxT, cache, mask_Bx1xTxS, rows)
    h = norm(name='mlp_norm')(x_BxTxD)
    x_BxTxD = x_BxTxD + self._mlp()(h)
    x_BxTxD = constrain(x_BxTxD, ('batch', 'length', 'embed'), self.rules)
    # (carry, output) so the same module works under nn.scan.
    return x_BxTxD, None

  def _mlp(self) -> nn.Module:
    c = self.cfg
    if not self.experts:
      return MLP(c, self.rules, self.deterministic, name='mlp')
    shared = None
    if c.moe.num_shared_experts:
      shared = functools.partial(MLP, c, self.rules, self.deterministic,
                                 c.moe.num_shared_experts * c.moe.width(c.d_ff))
    return moe.MoE(c, self.rules, self.deterministic, shared, name='mlp')


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, V) in the compute dtype.

  With `segment_ids_BxT` (packed documents), a token attends only to earlier tokens of
  its own segment, and positions default to each token's place in its segment.
  With `decode=True` (and the `cache` collection mutable) the T tokens continue what
  the cache holds; their `positions_BxT` are required, and -1 marks left padding.
  With `features=True` it returns the final-normed hidden states (B, T, D) instead of
  the logits: `output_head` gives the matrix that turns them into logits (then `softcap`
  with `logit_softcap`), so a chunked loss (lm/model/loss.py) can apply it a piece at a time.
  """

  cfg: ModelConfig
  rules: AxisRules | None = None

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None, *,
               segment_ids_BxT: jax.Array | None = None, train: bool = False,
               decode: bool = False, features: bool = False) -> jax.Array:
    c = self.cfg
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    cache, mask_Bx1xTxS = None, None
    if decode:
      if train or positions_BxT is None or segment_ids_BxT is not None:
        raise ValueError('decode=True needs positions_BxT and train=False, and takes no '
                         'segment_ids_BxT')
      cache = self._decode_state(positions_BxT)
    if segment_ids_BxT is not None and positions_BxT is None:
      positions_BxT = segment_positions(segment_ids_BxT)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    rows = None
    if not decode and context.split(self.rules, tokens_BxT.shape[1]):
      # Each device takes its share of every row, in the balancing order; attention
      # reads the order and the segments, the rest of the model is per token.
      rows, (tokens_BxT, positions_BxT) = context.Rows.split(
          c.context_order, self.rules, segment_ids_BxT, tokens_BxT, positions_BxT)
    elif segment_ids_BxT is not None:
      mask_Bx1xTxS = segment_mask(segment_ids_BxT)  # T x T: only for rows held whole.
    embed_VxD = self.param('embed', init(('vocab', 'embed')), (c.vocab_size, c.d_model), pdt)
    x_BxTxD = embed_rows(embed_VxD, tokens_BxT, dt, self.rules)
    x_BxTxD = constrain(x_BxTxD, ('batch', 'length', 'embed'), self.rules)
    x_BxTxD = nn.Dropout(c.dropout)(x_BxTxD, deterministic=not train)

    block = Block
    if c.remat:
      # Under scan, CSE across iterations is impossible anyway; prevent_cse only costs.
      block = nn.remat(block, policy=getattr(jax.checkpoint_policies, c.remat_policy),
                       prevent_cse=not c.scan_layers)
    if c.scan_layers:
      blocks = nn.scan(
          block, variable_axes={'params': 0, 'cache': 0, moe.STATS: 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=nn.broadcast, length=c.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      # Scanned layers are all alike (ModelConfig checks): all MoE or all dense.
      x_BxTxD, _ = blocks(c, self.rules, not train, decode, c.is_moe_layer(0),
                          name='blocks')(x_BxTxD, positions_BxT, cache, mask_Bx1xTxS, rows)
    else:
      for i in range(c.num_layers):
        x_BxTxD, _ = block(c, self.rules, not train, decode, c.is_moe_layer(i),
                           name=f'block_{i}')(x_BxTxD, positions_BxT, cache, mask_Bx1xTxS, rows)
    if rows is not None:  # Back in row order: the outputs as without a split.
      x_BxTxD = context.restore(x_BxTxD, c.context_order, self.rules)

    x_BxTxD = RMSNorm(c.norm_eps, dt, pdt, name='final_norm')(x_BxTxD)
    params = {'embed': embed_VxD}
    if not c.tie_embeddings:
      head_init = init(('embed', 'vocab'), mup.head_init_scale(c))
      params['head'] = self.param('head', head_init, (c.d_model, c.vocab_size), pdt)
    if features:
      return x_BxTxD
    head_DxV = output_head(params, c)
    logits_BxTxV = softcap(jnp.einsum('btd,dv->btv', x_BxTxD, head_DxV), c.logit_softcap)
    return constrain(logits_BxTxV, ('batch', 'length', 'vocab'), self.rules)

  def _decode_state(self, positions_BxT: jax.Array) -> DecodeState:
    """Advances the shared cache bookkeeping by T tokens; layers keep their own k, v.

    The index is a scalar as init makes it; a caller may hand in one per row instead.
    """
    t = positions_BxT.shape[1]
    # Created at init with the init input's shape: its length is the cache size S.
    positions = self.variable('cache', 'positions', jnp.zeros, positions_BxT.shape, jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    start = index.value
    positions.value = write_slots(positions.value, positions_BxT.astype(jnp.int32), start)
    index.value = start + t
    return DecodeState(start, decode_mask(positions.value, start, t))


def softcap(logits: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(logits / cap), in float32, back in the input's dtype; cap 0: unchanged."""
  if not cap:
    return logits
  return (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)


def _quantized(w: Any) -> bool:
  # Weights quantised for inference (lm/eval/quantize.py) are qwix QArrays: values and scales.
  return hasattr(w, 'qvalue')


def embed_rows(embed_VxD: Any, tokens_BxT: jax.Array, dt: Any,
               rules: AxisRules | None) -> jax.Array:
  """The embedding rows of `tokens` in the compute dtype (a quantised table's rows are
  gathered with their scales, then dequantised)."""
  if _quantized(embed_VxD):
    import qwix

    rows = jax.tree.map(lambda a: jnp.take(a, tokens_BxT, axis=0), embed_VxD)
    return qwix.dequantize(rows).astype(dt)
  # The whole table before the lookup, as FSDP gathers every weight before use. Left
  # sharded (vocab or embed), the rows come out split the wrong way for the batch-
  # sharded activations, and the partitioner replicates them to reshard.
  table_VxD = constrain(embed_VxD.astype(dt), (None, None), rules)
  return jnp.take(table_VxD, tokens_BxT, axis=0)


def output_head(params: Mapping[str, Any], cfg: ModelConfig) -> jax.Array:
  """The D x V output matrix in the compute dtype: the embedding's transpose when tied;
  times muP's logit multiplier 1/m when `mup_base_width` is set."""
  head = params['embed'] if cfg.tie_embeddings else params['head']
  if _quantized(head):
    import qwix

    head = qwix.dequantize(head)
  head_DxV = head.T if cfg.tie_embeddings else head
  if cfg.mup_base_width:
    head_DxV = head_DxV * mup.output_mult(cfg)
  return head_DxV.astype(jnp.dtype(cfg.dtype))
