"""Evaluation, in one place: the eval step, the loop, the summary and byte counting.

The training loop (lm/train/trainer.py) and scripts/eval.py (lm/eval/score_run.py, which adds file
scoring) both build their step with `make_eval_step`, their held-out rows with
`heldout_rows` and score with `evaluate`. Every batch carries a mask of the targets to
score, so a cut or padded batch counts exactly the tokens it holds. Task scoring
(lm/eval/tasks.py) builds `make_row_nll_step`, the same forward pass summed per row.

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

from data.batch import Batch
from data.config import DataConfig
from data.heldout import eval_batches
from data.tokenizer import Tokenizer
from lm.model.forward import forward
from lm.model.loss import chunked_token_nll, token_nll
from lm.model.transformer import Transformer, output_head
from lm.sharding import AxisRules, batch_sharding, put_rows

# A batch and the mask (B, T) of its targets to score: 1 scored, 0 padding or cut off.
ScoredBatch = tuple[Batch, np.ndarray]


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes each id decodes to; ids past the tokenizer's vocabulary score 0."""
  out = np.zeros(vocab_size, np.int64)
  lengths = tokenizer.byte_lengths()
  out[:len(lengths)] = lengths
  return out


def _token_nll(model: Transformer, rules: AxisRules, params: Any, batch: Batch,
               loss_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(NLL (B, T) of each target, the targets (B, T)); chunked when loss_chunk > 0."""
  out, targets_BxT = forward(model, params, batch, features=bool(loss_chunk))
  cfg = model.cfg
  if loss_chunk:
    nll_BxT, _ = chunked_token_nll(out, output_head(params, cfg), targets_BxT, loss_chunk,
                                   rules, cfg.logit_softcap)
  else:
    nll_BxT, _ = token_nll(out, targets_BxT)
  return nll_BxT, targets_BxT


def _in_shardings(rules: AxisRules, batch_shape: tuple[int, int],
                  param_shardings: Any) -> tuple[Any, ...]:
  # A prefix of the batch pytree: the same sharding for tokens and segment ids.
  return (param_shardings, batch_sharding(rules, batch_shape),
          batch_sharding(rules, (batch_shape[0], batch_shape[1] - 1)))


def make_eval_step(model: Transformer, rules: AxisRules, batch_shape: tuple[int, int],
                   param_shardings: Any, token_bytes: np.ndarray, *,
                   loss_chunk: int = 0) -> Callable[..., Any]:
  """(params, batch, mask (B, T)) -> (summed NLL, scored tokens, their bytes).

  A batch is data/batch.py's Batch, its rows (B, T + 1).
  `token_bytes[id]` is the number of bytes token `id` decodes to (0 for BOS/EOS). The
  mask is an int mask over the targets: padding (mask 0) adds nothing to any of the
  three sums. The sums are taken on the devices, so they cover every host's rows.
  `loss_chunk` > 0: the float32 NLL a chunk of tokens at a time, as training computes it.
  """
  bytes_V = jnp.asarray(token_bytes, jnp.int32)

  def score(params, batch, mask_BxT):
    nll_BxT, targets_BxT = _token_nll(model, rules, params, batch, loss_chunk)
    return (jnp.sum(jnp.where(mask_BxT > 0, nll_BxT, 0.0)), jnp.sum(mask_BxT),
            jnp.sum(bytes_V[targets_BxT] * mask_BxT))

  return jax.jit(score, in_shardings=_in_shardings(rules, batch_shape, param_shardings),
                 out_shardings=rules.replicated())


def make_row_nll_step(model: Transformer, rules: AxisRules, batch_shape: tuple[int, int],
                      param_shardings: Any, *, loss_chunk: int = 0) -> Callable[..., Any]:
  """(params, batch, mask (B, T)) -> the summed NLL of each row's masked targets, (B,).

  Scores several continuations at once (lm/eval/tasks.py): the result holds every
  host's rows, replicated, so each host can read all of them.
  """

  def score(params, batch, mask_BxT):
    nll_BxT, _ = _token_nll(model, rules, params, batch, loss_chunk)
    return jnp.sum(jnp.where(mask_BxT > 0, nll_BxT, 0.0), axis=1)

  return jax.jit(score, in_shardings=_in_shardings(rules, batch_shape, param_shardings),
                 out_shardings=rules.replicated())


def summarize(total_nll: float, tokens: int, num_bytes: int) -> dict[str, float]:
  """loss = mean NLL in nats; perplexity = e^loss; bits/byte = NLL / ln 2 / bytes."""
  loss = total_nll / max(tokens, 1)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': total_nll / math.log(2) / max(num_bytes, 1),
          'tokens': tokens, 'bytes': num_bytes}


def evaluate(eval_step: Callable[..., Any], params: Any, batches: Iterable[ScoredBatch],
             rules: AxisRules) -> dict[str, float]:
  """Scores the masked targets of `batches` (this process's rows of each global batch)."""
  total, tokens, num_bytes = 0.0, 0, 0
  for batch, mask in batches:
    nll, n, b = eval_step(params, *put_rows((batch, mask), rules))
    total += float(nll)
    tokens += int(n)
    num_bytes += int(b)
  return summarize(total, tokens, num_bytes)


def heldout_rows(data: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 num_batches: int, max_tokens: int = 0) -> list[ScoredBatch]:
  """This process's rows of the held-out batches, each with its mask of targets.

  `num_batches` global batches of `batch_size` rows, or with `max_tokens` > 0 as many as
  hold that many targets, the rest of the last one masked out.
  """
  local = batch_size // jax.process_count()
  num = math.ceil(max_tokens / (batch_size * seq_len)) if max_tokens else num_batches
  out = []
  for i, batch in enumerate(eval_batches(
      data, tokenizer, local, seq_len, num, process_index=jax.process_index(),
      process_count=jax.process_count())):
    # Index of each target in the global stream of targets, to cut at max_tokens.
    row_B = i * batch_size + jax.process_index() * local + np.arange(local)
    target_BxT = row_B[:, None] * seq_len + np.arange(seq_len)
    keep = target_BxT < max_tokens if max_tokens else np.ones_like(target_BxT, bool)
    if batch.loss_mask is not None:  # Fine-tuning: responses only.
      keep &= batch.loss_mask[:, 1:] > 0
    out.append((batch, keep.astype(np.int32)))
  return out
