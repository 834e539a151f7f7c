"""Sampling from a trained model with a KV cache: one prefill, then a compiled decode loop.

Prompts of different lengths are left-padded to a common length P (padding has position
-1, which the cache mask hides), so every row writes the same cache slot at each step.
The cache holds P + max_new_tokens slots; each new token costs one forward pass of
length 1 with attention over those slots, never a recompute of the prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm.eval.quantize import NONE, quantized_model
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sharding import AxisRules

if TYPE_CHECKING:  # Only for a type hint: sampling itself needs no checkpoint code.
  from lm.run.folder import Run


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each next token; temperature 0 is greedy."""

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0  # Keep the k most likely tokens; 0 = all.
  top_p: float = 1.0  # Keep the smallest set whose probability reaches top_p; 1 = all.
  eos_id: int | None = None  # A row stops after emitting it.
  vocab_limit: int = 0  # Never emit ids >= this (past the tokenizer's vocabulary); 0 = off.

  def validate(self) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be positive, got {self.max_new_tokens}')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


def sampling_model(cfg: ModelConfig, rules: AxisRules | None = None) -> Transformer:
  """The model for decoding: same parameters, no remat or dropout.

  With `rules` (the mesh the parameters live on) activations and the cache follow the
  training layout: heads split over `tensor`, rows over the batch axes where they divide.
  """
  return Transformer(dataclasses.replace(cfg, remat=False, dropout=0.0), rules=rules)


def init_cache(model: Transformer, batch: int, max_len: int) -> Any:
  """An empty cache of `max_len` slots for `batch` rows (zeros; index 0)."""
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(
      functools.partial(model.init, decode=True), jax.random.PRNGKey(0), tokens, tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def decode_step(model: Transformer, params: Any, cache: Any, tokens_BxT: jax.Array,
                positions_BxT: jax.Array) -> tuple[jax.Array, Any]:
  """Feeds T tokens after what `cache` holds: (float32 logits B x T x V, new cache)."""
  logits_BxTxV, mutated = model.apply({'params': params, 'cache': cache}, tokens_BxT,
                                      positions_BxT, decode=True, mutable=['cache'])
  return logits_BxTxV.astype(jnp.float32), mutated['cache']


def filter_logits(logits_BxV: jax.Array, temperature: float | jax.Array,
                  top_p: float | jax.Array = 1.0, top_k: int = 0,
                  vocab_limit: int = 0) -> jax.Array:
  """Temperature, then top-k, then top-p: dropped tokens get a huge negative logit.

  temperature (> 0) and top_p may be traced; top_k and vocab_limit shape the program.
  """
  neg_inf = jnp.finfo(jnp.float32).min
  logits_BxV = logits_BxV.astype(jnp.float32)
  if vocab_limit and vocab_limit < logits_BxV.shape[-1]:
    logits_BxV = logits_BxV.at[:, vocab_limit:].set(neg_inf)
  logits_BxV = logits_BxV / temperature
  if top_k and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)

  def nucleus(logits_BxV):
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token stays if the tokens ranked above it hold less than top_p: the first always.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_B = jnp.sum(before_BxV < top_p, axis=-1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV < cutoff_Bx1, neg_inf, logits_BxV)

  # A sort per step only when top_p asks for it.
  return jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits_BxV)


class _Program(NamedTuple):
  """The settings that change the compiled program; the rest are traced arguments."""

  max_new_tokens: int
  greedy: bool
  top_k: int
  vocab_limit: int


def _next_token(logits_BxV: jax.Array, key: jax.Array, prog: _Program,
                knobs: dict[str, jax.Array]) -> jax.Array:
  """One token per row: argmax when greedy, else a draw from the filtered logits."""
  if prog.greedy:
    if prog.vocab_limit and prog.vocab_limit < logits_BxV.shape[-1]:
      logits_BxV = logits_BxV[:, :prog.vocab_limit]
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BxV, knobs['temperature'], knobs['top_p'], prog.top_k,
                           prog.vocab_limit)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(model: Transformer, params: Any, tokens_BxP: jax.Array, positions_BxP: jax.Array,
              key: jax.Array, prog: _Program, knobs: dict[str, jax.Array]) -> jax.Array:
  """Prefill, then a while loop that ends at max_new_tokens or when every row is done."""
  b, p = tokens_BxP.shape
  n = prog.max_new_tokens
  cache = init_cache(model, b, p + n)
  logits_BxPxV, cache = decode_step(model, params, cache, tokens_BxP, positions_BxP)
  first_B = _next_token(logits_BxPxV[:, -1], jax.random.fold_in(key, 0), prog, knobs)
  next_pos_B = positions_BxP[:, -1] + 1  # Position of the first new token.
  out_BxN = jnp.zeros((b, n), jnp.int32).at[:, 0].set(first_B)

  def more(carry):
    i, _, _, _, done_B = carry
    return (i < n) & ~jnp.all(done_B)

  def step(carry):
    i, last_B, cache, out_BxN, done_B = carry
    positions_Bx1 = (next_pos_B + i - 1)[:, None]
    logits_Bx1xV, cache = decode_step(model, params, cache, last_B[:, None], positions_Bx1)
    token_B = _next_token(logits_Bx1xV[:, 0], jax.random.fold_in(key, i), prog, knobs)
    token_B = jnp.where(done_B, 0, token_B)  # Finished rows idle; the host cuts at EOS.
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, i))
    return i + 1, token_B, cache, out_BxN, done_B | (token_B == knobs['eos'])

  carry = (jnp.int32(1), first_B, cache, out_BxN, first_B == knobs['eos'])
  return jax.lax.while_loop(more, step, carry)[3]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, positions), each B x P; padding sits on the left with position -1."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token (e.g. BOS)')
  p = max(len(x) for x in prompts)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  positions = np.full((len(prompts), p), -1, np.int32)
  for row, ids in enumerate(prompts):
    tokens[row, p - len(ids):] = ids
    positions[row, p - len(ids):] = np.arange(len(ids))
  return tokens, positions


def generate(model: Transformer, params: Any, prompts: Sequence[Sequence[int]],
             cfg: SamplingConfig, seed: int = 0) -> list[list[int]]:
  """New ids for each prompt: up to max_new_tokens, ending with EOS if one was emitted.

  The same seed gives the same samples; temperature 0 ignores it.
  """
  cfg.validate()
  tokens, positions = left_pad(prompts)
  # Only these shape the program: a new temperature, top_p or EOS does not recompile.
  prog = _Program(cfg.max_new_tokens, cfg.temperature == 0, cfg.top_k, cfg.vocab_limit)
  knobs = {'temperature': jnp.float32(cfg.temperature or 1.0), 'top_p': jnp.float32(cfg.top_p),
           'eos': jnp.int32(-1 if cfg.eos_id is None else cfg.eos_id)}
  out = np.asarray(_generate(model, params, jnp.asarray(tokens), jnp.asarray(positions),
                             jax.random.PRNGKey(seed), prog, knobs))
  rows = []
  for ids in out.tolist():
    if cfg.eos_id is not None and cfg.eos_id in ids:
      ids = ids[:ids.index(cfg.eos_id) + 1]
    rows.append(ids)
  return rows


def past_training(model: ModelConfig, seq_len: int, positions: int) -> str:
  """'' if `positions` tokens (prompt and new ones) stay within the rows the model
  trained on, else one line saying they do not. Nothing stops RoPE there: it rotates any
  position, but the model has never seen those angles, so the text degrades."""
  if positions <= seq_len:
    return ''
  line = (f'positions up to {positions} go past the {seq_len} tokens a row the model '
          'trained on (seq_len); RoPE extrapolates them')
  reach = int(model.rope_original_max_position * model.rope_scaling)
  if model.rope_scaling and positions > reach:
    line += (f', and past the {reach} its RoPE scaling reaches (rope_original_max_position'
             ' x rope_scaling)')
  return line


def run_model(run: Run) -> Transformer:
  """The sampling model of a trained run, reading its weights quantised if they are."""
  return quantized_model(sampling_model(run.cfgs.model, run.rules), run.quant or NONE)


def complete(run: Run, prompt: str, cfg: SamplingConfig, seed: int = 0,
             timed: bool = False) -> dict[str, Any]:
  """{"prompt_ids", "ids", "text"} for one text prompt of a trained run.

  The prompt starts with BOS, as every training document does; `ids` are the new ids
  only and `text` their decoding (EOS, if reached, decodes to nothing). `timed` adds
  "tokens_per_sec": a second, identical generation timed once the first has compiled.
  """
  tok = run.tokenizer
  prompt_ids = [tok.bos_id] + tok.encode(prompt)
  cfg = dataclasses.replace(cfg, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
  model = run_model(run)
  ids = generate(model, run.params, [prompt_ids], cfg, seed)[0]
  out = {'prompt_ids': prompt_ids, 'ids': ids, 'text': tok.decode(ids)}
  if timed:
    start = time.perf_counter()
    generate(model, run.params, [prompt_ids], cfg, seed)
    out['tokens_per_sec'] = len(ids) / (time.perf_counter() - start)
  return out
