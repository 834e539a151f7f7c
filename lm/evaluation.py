"""Held-out loss, perplexity and bits per byte.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of
the text that was scored, so it compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import Transformer
from lm.sharding import AxisRules, batch_sharding, global_batch


def make_eval_step(model: Transformer, rules: AxisRules, batch_shape: tuple[int, int],
                   param_shardings: Any, token_bytes: np.ndarray, *,
                   masked: bool = False) -> Callable[..., Any]:
  """(params, tokens (B, T + 1)[, mask (B, T)]) -> (summed NLL, scored tokens, their bytes).

  `token_bytes[id]` is the number of bytes token `id` decodes to (0 for BOS/EOS). With
  `masked`, the step takes a third argument, an int mask over the targets: padding
  (mask 0) adds nothing to any of the three sums. The sums are taken on the devices, so
  they cover every host's rows.
  """
  bytes_V = jnp.asarray(token_bytes, jnp.int32)

  def score(params, tokens_BxT1, mask_BxT=None):
    logits = model.apply({'params': params}, tokens_BxT1[:, :-1]).astype(jnp.float32)
    targets_BxT = tokens_BxT1[:, 1:]
    if mask_BxT is None:
      mask_BxT = jnp.ones(targets_BxT.shape, jnp.int32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll_BxT = log_z - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return (jnp.sum(jnp.where(mask_BxT > 0, nll_BxT, 0.0)), jnp.sum(mask_BxT),
            jnp.sum(bytes_V[targets_BxT] * mask_BxT))

  tokens_sharding = batch_sharding(rules, batch_shape)
  in_shardings = (param_shardings, tokens_sharding)
  if masked:
    in_shardings += (batch_sharding(rules, (batch_shape[0], batch_shape[1] - 1)),)
  return jax.jit(score, in_shardings=in_shardings, out_shardings=rules.replicated())


def summarize(total_nll: float, tokens: int, num_bytes: int) -> dict[str, float]:
  """loss = mean NLL in nats; perplexity = e^loss; bits/byte = NLL / ln 2 / bytes."""
  loss = total_nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': total_nll / math.log(2) / max(num_bytes, 1),
          'tokens': tokens, 'bytes': num_bytes}


def evaluate(eval_step: Callable[..., Any], params: Any,
             batches: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]],
             rules: AxisRules) -> dict[str, float]:
  """Scores the target tokens of `batches` (this process's rows of each global batch).

  A batch is tokens (B, T + 1), or (tokens, mask (B, T)) for a step made with `masked`.
  """
  total, tokens, num_bytes = 0.0, 0, 0
  for batch in batches:
    arrays = batch if isinstance(batch, tuple) else (batch,)
    on_devices = []
    for local in arrays:
      shape = (local.shape[0] * jax.process_count(), local.shape[1])
      on_devices.append(global_batch(local, batch_sharding(rules, shape)))
    nll, n, b = eval_step(params, *on_devices)
    total += float(nll)
    tokens += int(n)
    num_bytes += int(b)
  return summarize(total, tokens, num_bytes)
