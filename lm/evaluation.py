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
                   param_shardings: Any, token_bytes: np.ndarray) -> Callable[..., Any]:
  """(params, tokens (B, T + 1)) -> (summed NLL, scored tokens, their UTF-8 bytes).

  `token_bytes[id]` is the number of bytes token `id` decodes to (0 for BOS/EOS). The
  sums are taken on the devices, so they cover every host's rows.
  """
  bytes_V = jnp.asarray(token_bytes, jnp.int32)

  def score(params, tokens_BxT1):
    logits = model.apply({'params': params}, tokens_BxT1[:, :-1]).astype(jnp.float32)
    targets_BxT = tokens_BxT1[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll_BxT = log_z - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BxT), targets_BxT.size, jnp.sum(bytes_V[targets_BxT])

  return jax.jit(score, in_shardings=(param_shardings, batch_sharding(rules, batch_shape)),
                 out_shardings=rules.replicated())


def summarize(total_nll: float, tokens: int, num_bytes: int) -> dict[str, float]:
  """loss = mean NLL in nats; perplexity = e^loss; bits/byte = NLL / ln 2 / bytes."""
  loss = total_nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': total_nll / math.log(2) / max(num_bytes, 1),
          'tokens': tokens, 'bytes': num_bytes}


def evaluate(eval_step: Callable[..., Any], params: Any, batches: Iterable[np.ndarray],
             rules: AxisRules) -> dict[str, float]:
  """Scores every target token of `batches` (this process's rows of each global batch)."""
  total, tokens, num_bytes = 0.0, 0, 0
  for local in batches:
    shape = (local.shape[0] * jax.process_count(), local.shape[1])
    nll, n, b = eval_step(params, global_batch(local, batch_sharding(rules, shape)))
    total += float(nll)
    tokens += int(n)
    num_bytes += int(b)
  return summarize(total, tokens, num_bytes)
