"""Held-out loss, perplexity and bits per byte.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of
the text that was scored, so it compares models with different tokenizers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.loss import chunked_token_nll, token_nll
from lm.model import Transformer, output_head
from lm.sharding import AxisRules, batch_sharding, global_batch
from lm.train_step import next_token_pairs


def make_eval_step(model: Transformer, rules: AxisRules, batch_shape: tuple[int, int],
                   param_shardings: Any, token_bytes: np.ndarray, *,
                   masked: bool = False) -> Callable[..., Any]:
  """(params, batch[, mask (B, T)]) -> (summed NLL, scored tokens, their bytes).

  A batch is tokens (B, T + 1) or {'tokens', 'segment_ids'} (lm/train_step.py's Batch).
  `token_bytes[id]` is the number of bytes token `id` decodes to (0 for BOS/EOS). With
  `masked`, the step takes a third argument, an int mask over the targets: padding
  (mask 0) adds nothing to any of the three sums. The sums are taken on the devices, so
  they cover every host's rows.
  """
  bytes_V = jnp.asarray(token_bytes, jnp.int32)
  cfg = model.cfg

  def score(params, batch, mask_BxT=None):
    inputs_BxT, segments_BxT, targets_BxT = next_token_pairs(batch)
    apply = functools.partial(model.apply, {'params': params}, inputs_BxT,
                              segment_ids_BxT=segments_BxT)
    if cfg.loss_chunk:
      nll_BxT, _ = chunked_token_nll(apply(features=True), output_head(params, cfg),
                                     targets_BxT, cfg.loss_chunk, rules)
    else:
      nll_BxT, _ = token_nll(apply(), targets_BxT)
    if mask_BxT is None:
      mask_BxT = jnp.ones(targets_BxT.shape, jnp.int32)
    return (jnp.sum(jnp.where(mask_BxT > 0, nll_BxT, 0.0)), jnp.sum(mask_BxT),
            jnp.sum(bytes_V[targets_BxT] * mask_BxT))

  # A prefix of the batch pytree: the same sharding for tokens and segment ids.
  in_shardings = (param_shardings, batch_sharding(rules, batch_shape))
  if masked:
    in_shardings += (batch_sharding(rules, (batch_shape[0], batch_shape[1] - 1)),)
  return jax.jit(score, in_shardings=in_shardings, out_shardings=rules.replicated())


def summarize(total_nll: float, tokens: int, num_bytes: int) -> dict[str, float]:
  """loss = mean NLL in nats; perplexity = e^loss; bits/byte = NLL / ln 2 / bytes."""
  loss = total_nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': total_nll / math.log(2) / max(num_bytes, 1),
          'tokens': tokens, 'bytes': num_bytes}


def evaluate(eval_step: Callable[..., Any], params: Any, batches: Iterable[Any],
             rules: AxisRules) -> dict[str, float]:
  """Scores the target tokens of `batches` (this process's rows of each global batch).

  A batch is tokens (B, T + 1) or a {'tokens', 'segment_ids'} dict, or a tuple
  (either, mask (B, T)) for a step made with `masked`.
  """
  def on_devices(local: np.ndarray) -> jax.Array:
    shape = (local.shape[0] * jax.process_count(), local.shape[1])
    return global_batch(local, batch_sharding(rules, shape))

  total, tokens, num_bytes = 0.0, 0, 0
  for batch in batches:
    args = batch if isinstance(batch, tuple) else (batch,)
    nll, n, b = eval_step(params, *jax.tree.map(on_devices, args))
    total += float(nll)
    tokens += int(n)
    num_bytes += int(b)
  return summarize(total, tokens, num_bytes)
