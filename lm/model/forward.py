"""The forward pass that training and evaluation share: a batch in, the loss or the
model's output out.

A batch is data/batch.py's Batch: token rows (B, T + 1) whose first T tokens are the
inputs and last T the targets, with segment ids (packed documents) and a loss mask
(fine-tuning) when it has them.
"""

from __future__ import annotations

from typing import Any

import jax

from data.batch import Batch
from lm.model import moe
from lm.model.loss import Metrics, chunked_cross_entropy, cross_entropy, loss_weights
from lm.model.transformer import Transformer, output_head


def next_token_pairs(batch: Batch) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """(inputs (B, T), their segment ids or None, targets (B, T))."""
  segments = batch.segment_ids
  return batch.tokens[:, :-1], None if segments is None else segments[:, :-1], batch.tokens[:, 1:]


def target_weights(batch: Batch, scale: float = 1.0) -> jax.Array | None:
  """float32 (B, T) weights of the targets, for the mean over trained tokens only, or
  None (no loss mask: every target alike)."""
  return None if batch.loss_mask is None else loss_weights(batch.loss_mask[:, 1:], scale)


def forward(model: Transformer, params: Any, batch: Batch, *, features: bool = False,
            train: bool = False, rngs: dict[str, jax.Array] | None = None,
            ) -> tuple[jax.Array, jax.Array]:
  """(the model's output on the batch's inputs, the targets (B, T)): the one forward pass
  of training and evaluation. The output is the logits (B, T, V), or with `features`
  the final normed activations (B, T, D), which a chunked loss multiplies by the head a
  piece at a time."""
  out, targets_BxT, _ = _run(model, params, batch, features, train, rngs)
  return out, targets_BxT


def _run(model: Transformer, params: Any, batch: Batch, features: bool, train: bool,
         rngs: dict[str, jax.Array] | None) -> tuple[jax.Array, jax.Array, Any]:
  """forward's output and targets, and what MoE layers sowed (None for a dense model)."""
  inputs_BxT, segments_BxT, targets_BxT = next_token_pairs(batch)
  kwargs = dict(segment_ids_BxT=segments_BxT, train=train, rngs=rngs, features=features)
  if not model.cfg.moe.enabled:
    return model.apply({'params': params}, inputs_BxT, **kwargs), targets_BxT, None
  out, sown = model.apply({'params': params}, inputs_BxT, mutable=[moe.STATS], **kwargs)
  return out, targets_BxT, sown[moe.STATS]


def model_loss(model: Transformer, params: Any, batch: Batch, *, chunk: int = 0,
               z_loss: float = 0.0, train: bool = False,
               rngs: dict[str, jax.Array] | None = None,
               weights_BxT: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """The next-token loss of `batch`; chunked (lm/model/loss.py) when `chunk` > 0; a mean over
  the trained tokens only when the batch has a loss mask. `weights_BxT` replaces the
  mask's weights (the train step weighs a whole batch before splitting it).

  With MoE layers the loss adds their weighted balance and router z-losses, and the
  metrics carry `moe_balance` and `moe_router_z` (means over the MoE layers) and
  `moe_stats`, the tree the layers sowed (the train step reads its counts)."""
  out, targets_BxT, sown = _run(model, params, batch, bool(chunk), train, rngs)
  if weights_BxT is None:
    weights_BxT = target_weights(batch)
  if chunk:
    loss, metrics = chunked_cross_entropy(
        out, output_head(params, model.cfg), targets_BxT, chunk=chunk, z_loss=z_loss,
        rules=model.rules, weights_BxT=weights_BxT, softcap=model.cfg.logit_softcap)
  else:
    loss, metrics = cross_entropy(out, targets_BxT, z_loss, weights_BxT)
  if sown is None:
    return loss, metrics
  return moe.add_losses(loss, metrics, sown, model.cfg.moe)
