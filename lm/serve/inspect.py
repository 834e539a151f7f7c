"""What the chat page's second view draws for one prompt (POST /v1/inspect).

The logit lens (nostalgebraist, 2020): the residual stream after each layer put through
the final norm and the output head, as if the model stopped there; the top token and its
probability at every layer and position show where a prediction forms. Attention weights:
one layer's and head's softmax(q k / sqrt(H)) over the prompt, recomputed from that
layer's normed input and its query and key weights (the model's own attention call does
not return them); tests check the recomputation against the layer's real output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.model import mup
from lm.model.config import ModelConfig
from lm.model.params import unstack_layers
from lm.model.positions import rope, rope_frequencies
from lm.model.transformer import Block, RMSNorm, Transformer, output_head, softcap
from lm.serve.engine import bucket, buckets
from lm.serve.protocol import ApiError, bad

LENS_TOP = 3  # Alternatives per cell of the lens.


def _capture(mdl: nn.Module, method: str) -> bool:
  # Each block's output (the residual stream) and each attention norm's (its input).
  return method == '__call__' and (isinstance(mdl, Block) or mdl.name == 'attn_norm')


def lens(cfg: ModelConfig, params: Any, hidden_LxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top LENS_TOP (probabilities, ids) of the next token from each layer's residual
  stream: L x T x LENS_TOP each."""
  normed = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)).apply(
      {'params': params['final_norm']}, hidden_LxTxD)
  logits = softcap(jnp.einsum('ltd,dv->ltv', normed, output_head(params, cfg)),
                   cfg.logit_softcap).astype(jnp.float32)
  return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), LENS_TOP)


def attention_weights(cfg: ModelConfig, layer: Any, h_TxD: jax.Array, head: int) -> jax.Array:
  """T x T causal attention weights of query head `head`, from the layer's normed input."""
  attn = layer['attn']
  dt = jnp.dtype(cfg.dtype)
  head = jnp.asarray(head)
  kv = head // (cfg.num_heads // cfg.num_kv_heads)
  q_TxH = jnp.einsum('td,dh->th', h_TxD, jnp.asarray(attn['q'][:, head], dt))
  k_TxH = jnp.einsum('td,dh->th', h_TxD, jnp.asarray(attn['k'][:, kv], dt))
  if cfg.qk_norm:
    norm = RMSNorm(cfg.norm_eps, dt, jnp.dtype(cfg.param_dtype), 'head_dim')
    q_TxH = norm.apply({'params': attn['q_norm']}, q_TxH)
    k_TxH = norm.apply({'params': attn['k_norm']}, k_TxH)
  t = h_TxD.shape[0]
  positions_1xT = jnp.arange(t)[None]
  freq = rope_frequencies(cfg)
  q_TxH = rope(q_TxH[None, :, None], positions_1xT, freq)[0, :, 0]
  k_TxH = rope(k_TxH[None, :, None], positions_1xT, freq)[0, :, 0]
  scale = mup.attention_scale(cfg) or cfg.head_size ** -0.5
  scores = jnp.einsum('th,sh->ts', q_TxH, k_TxH).astype(jnp.float32) * scale
  causal = jnp.tril(jnp.ones((t, t), bool))
  return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _look(model: Transformer, params: Any, tokens_1xT: jax.Array, layer: jax.Array,
          head: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(lens probabilities, lens ids, attention weights) for one prompt; the layer and the
  head are traced, so one program serves them all (one per prompt bucket)."""
  c = model.cfg
  _, state = model.apply({'params': params}, tokens_1xT, capture_intermediates=_capture,
                         mutable=['intermediates'])
  got = state['intermediates']
  blocks = [f'block_{i}' for i in range(c.num_layers)]
  hidden_LxTxD = jnp.stack([got[b]['__call__'][0][0][0] for b in blocks])
  probs, ids = lens(c, params, hidden_LxTxD)
  normed_LxTxD = jnp.stack([got[b]['attn_norm']['__call__'][0][0] for b in blocks])
  attn = jax.tree.map(lambda *xs: jnp.stack(xs)[layer], *[params[b]['attn'] for b in blocks])
  return probs, ids, attention_weights(c, {'attn': attn}, normed_LxTxD[layer], head)


@dataclasses.dataclass
class Inspector:
  """Answers /v1/inspect for a run's model (unquantised weights). Prompts are padded on
  the right to the serving buckets (causal attention: padding changes nothing before
  it), so after `warm_up` no prompt compiles a program."""

  run: Any  # lm/run/folder.py's Run
  context: int

  def __post_init__(self) -> None:
    cfg = self.run.cfgs.model
    self.cfg = dataclasses.replace(cfg, remat=False, dropout=0.0, scan_layers=False)
    params = self.run.params
    if cfg.scan_layers:
      params = unstack_layers(params, cfg.num_layers)
    self.params = params
    self.model = Transformer(self.cfg)
    self.buckets = buckets(self.context)

  def warm_up(self) -> None:
    if self._quantized():
      return
    for b in self.buckets:
      self._look([0] * b, 0, 0)

  def _quantized(self) -> bool:
    return self.run.quant is not None and self.run.quant.on

  def _look(self, ids: list[int], layer: int, head: int) -> tuple[np.ndarray, ...]:
    n = len(ids)
    padded = np.zeros((1, bucket(self.buckets, n)), np.int32)
    padded[0, :n] = ids
    probs, top, weights = jax.device_get(_look(self.model, self.params, jnp.asarray(padded),
                                               jnp.int32(layer), jnp.int32(head)))
    return probs[:, :n], top[:, :n], weights[:n, :n]

  def answer(self, body: dict[str, Any]) -> dict[str, Any]:
    if self._quantized():
      raise ApiError(400, 'inspection reads the unquantised weights; serve without --quantize')
    for key in body:
      if key not in ('prompt', 'layer', 'head', 'model'):
        raise bad(key, 'unknown field')
    prompt = body.get('prompt')
    if not isinstance(prompt, str) or not prompt:
      raise bad('prompt', 'required: a non-empty string')
    c = self.cfg
    layer = _index(body, 'layer', c.num_layers)
    head = _index(body, 'head', c.num_heads)
    tok = self.run.tokenizer
    ids = [tok.bos_id] + tok.encode(prompt)
    if len(ids) > self.context:
      raise bad('prompt', f'{len(ids)} tokens; the context is {self.context}')
    probs, top, weights = self._look(ids, layer, head)
    text = tok.piece_text
    return {
        'tokens': [text(i) for i in ids], 'ids': ids, 'layers': c.num_layers,
        'heads': c.num_heads, 'layer': layer, 'head': head,
        # lens[k][t]: what layer k's stream predicts after token t, most likely first.
        'lens': [[[{'token': text(int(i)), 'prob': round(float(p), 4)}
                   for i, p in zip(top[k, t], probs[k, t])] for t in range(len(ids))]
                 for k in range(c.num_layers)],
        'attention': np.round(weights, 4).tolist()}


def _index(body: dict[str, Any], key: str, n: int) -> int:
  v = body.get(key, 0)
  if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
    raise bad(key, f'must be an integer in [0, {n - 1}], got {v!r}')
  return v
