"""Decode slots sharing one KV cache: the compiled half of continuous batching.

The cache holds `slots` rows of `max_len` positions. Each row belongs to at most one
request and advances on its own (a per-row cache index, lm/model/transformer.py's
DecodeState): a new prompt is prefilled alone into a small cache of a bucketed length,
right-padded, and copied into its row, while the other rows keep their place; then one
`step` feeds every row its last token and picks the next. Only three programs exist
after warm-up: one prefill per bucket, the step, nothing else, so no request recompiles.

Greedy decoding does not depend on the other rows: every row's attention reads its own
slots only, and an idle row feeds padding (position -1) that no one attends to.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm.eval.sampling import decode_step, init_cache
from lm.model.transformer import Transformer

TOP_LOGPROBS = 20  # The most alternatives a request may ask for (OpenAI's limit too).


def bucket(lengths: Sequence[int], n: int) -> int:
  """The shortest of `lengths` (ascending) that holds n tokens."""
  for b in lengths:
    if n <= b:
      return b
  raise ValueError(f'a prompt of {n} tokens is longer than the context ({lengths[-1]})')


def buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Prefill lengths: powers of two from `smallest`, then `max_len` itself."""
  out = []
  n = smallest
  while n < max_len:
    out.append(n)
    n *= 2
  return (*out, max_len)


class Knobs(NamedTuple):
  """Per-row sampling settings, traced (changing them never recompiles)."""

  temperature: jax.Array  # float32; 0 = greedy.
  top_p: jax.Array  # float32 in (0, 1].
  top_k: jax.Array  # int32; 0 = all.
  seed: jax.Array  # int32: the request's seed; the draw for token i folds in i.
  count: jax.Array  # int32: tokens the row has produced so far.


class Picked(NamedTuple):
  """The token each row produced, with its log-probability under the model (before
  temperature and filtering) and the TOP_LOGPROBS most likely alternatives."""

  token: jax.Array
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array


def pick(logits_BxV: jax.Array, knobs: Knobs, vocab_limit: int) -> Picked:
  """One token per row: argmax where temperature is 0, else a draw from the logits
  scaled by temperature and cut to the row's top-k, then to its top-p mass."""
  neg_inf = jnp.finfo(jnp.float32).min
  logits_BxV = logits_BxV.astype(jnp.float32)
  v = logits_BxV.shape[-1]
  if vocab_limit and vocab_limit < v:
    logits_BxV = logits_BxV.at[:, vocab_limit:].set(neg_inf)
  greedy_B = knobs.temperature == 0
  best_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled_BxV = logits_BxV / jnp.where(greedy_B, 1.0, knobs.temperature)[:, None]
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
    k_B = jnp.where(knobs.top_k > 0, jnp.minimum(knobs.top_k, v), v)
    ranks_V = jnp.arange(v)
    in_k_BxV = ranks_V < k_B[:, None]
    probs_BxV = jax.nn.softmax(jnp.where(in_k_BxV, sorted_BxV, neg_inf), axis=-1)
    # A token stays if those ranked above it hold less than top_p: the first always.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.maximum(jnp.sum((before_BxV < knobs.top_p[:, None]) & in_k_BxV, axis=-1), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    filtered_BxV = jnp.where(scaled_BxV < cutoff_Bx1, neg_inf, scaled_BxV)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(
        knobs.seed, knobs.count)
    drawn_B = jax.vmap(jax.random.categorical)(keys, filtered_BxV).astype(jnp.int32)
    return jnp.where(greedy_B, best_B, drawn_B)

  # The sort only when some row samples.
  token_B = jax.lax.cond(jnp.all(greedy_B), lambda _: best_B, draw, None)
  logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  top_lp, top_ids = jax.lax.top_k(logprobs_BxV, min(TOP_LOGPROBS, v))
  chosen_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
  return Picked(token_B, chosen_B, top_ids.astype(jnp.int32), top_lp)


def _insert(cache: dict[str, Any], row: dict[str, Any], slot: jax.Array) -> dict[str, Any]:
  """`row` (a one-row cache of P <= max_len positions) copied into row `slot` of `cache`
  from position 0. Keys and values end in (B, S, K, H), scanned ones with a layer axis
  in front; the shared positions are (B, S)."""
  def put(path, big, small):
    name = path[-1].key
    if name == 'index':
      return big
    batch_axis = 0 if name == 'positions' else big.ndim - 4
    starts = [0] * big.ndim
    starts[batch_axis] = slot
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), starts)

  return jax.tree_util.tree_map_with_path(put, cache, row)


@dataclasses.dataclass
class Engine:
  """The model, its parameters and the slots' cache on the device."""

  model: Transformer
  params: Any
  slots: int
  max_len: int
  vocab_limit: int  # Never emit ids >= this (past the tokenizer's vocabulary).

  def __post_init__(self) -> None:
    self.buckets = buckets(self.max_len)
    self.cache = init_cache(self.model, self.slots, self.max_len)
    self.cache['index'] = jnp.zeros((self.slots,), jnp.int32)
    self._prefill = jax.jit(functools.partial(_prefill, self.model, self.vocab_limit),
                            donate_argnums=(1,))
    self._step = jax.jit(functools.partial(_step, self.model, self.vocab_limit),
                         donate_argnums=(1,))

  def prefill(self, slot: int, prompt: Sequence[int], knobs: Knobs) -> Picked:
    """Writes `prompt` into row `slot` (whatever it held is forgotten); its first token."""
    n = len(prompt)
    tokens = np.zeros((1, bucket(self.buckets, n)), np.int32)
    tokens[0, :n] = prompt
    picked, self.cache = self._prefill(self.params, self.cache, jnp.asarray(tokens),
                                       jnp.int32(n), jnp.int32(slot), knobs)
    return jax.device_get(picked)

  def step(self, last: np.ndarray, positions: np.ndarray, knobs: Knobs) -> Picked:
    """One token for every row: `last` (slots,) are their previous tokens, `positions`
    where those sit in their requests (-1 for an idle row, which then stays put)."""
    picked, self.cache = self._step(self.params, self.cache, jnp.asarray(last, jnp.int32),
                                    jnp.asarray(positions, jnp.int32), knobs)
    return jax.device_get(picked)

  def compiled(self) -> int:
    """Programs compiled so far: each bucket's prefill and the step, each once per cache
    layout it has seen."""
    return self._prefill._cache_size() + self._step._cache_size()


def _prefill(model: Transformer, vocab_limit: int, params: Any, cache: dict[str, Any],
             tokens_1xP: jax.Array, n: jax.Array, slot: jax.Array,
             knobs: Knobs) -> tuple[Picked, dict[str, Any]]:
  p = tokens_1xP.shape[1]
  positions_1xP = jnp.where(jnp.arange(p) < n, jnp.arange(p), -1)[None]
  row = init_cache(model, 1, p)
  logits_1xPxV, row = decode_step(model, params, row, tokens_1xP, positions_1xP)
  logits_1xV = jax.lax.dynamic_slice_in_dim(logits_1xPxV, n - 1, 1, axis=1)[:, 0]
  picked = pick(logits_1xV, knobs, vocab_limit)
  cache = _insert(cache, row, slot)
  cache['index'] = cache['index'].at[slot].set(n)  # The first new token goes at slot n.
  return picked, cache


def _step(model: Transformer, vocab_limit: int, params: Any, cache: dict[str, Any],
          last_B: jax.Array, positions_B: jax.Array,
          knobs: Knobs) -> tuple[Picked, dict[str, Any]]:
  index_B = cache['index']
  logits_Bx1xV, cache = decode_step(model, params, cache, last_B[:, None], positions_B[:, None])
  # An idle row does not advance: it never runs past its slots.
  cache['index'] = jnp.where(positions_B >= 0, index_B + 1, index_B)
  return pick(logits_Bx1xV[:, 0], knobs, vocab_limit), cache
