"""The batch: one typed record of token rows and what travels with them, made here and
read by the train and eval steps (lm/model/forward.py).

A NamedTuple is a JAX pytree, so a Batch is sharded, split into micro-batches and passed
through jit as it is; a field left None is no leaf at all.
"""

from typing import Any, NamedTuple

import numpy as np


class Batch(NamedTuple):
  """Rows (B, T + 1): inputs are each row's first T tokens, targets its last T.

  Numpy arrays on the data side, device arrays inside the steps.
  """

  tokens: Any
  """int32 token ids."""
  segment_ids: Any = None
  """Which document each token belongs to, numbered from 1 in every row (packed
  documents, data.segment_ids or fine-tuning); None: one sequence per row."""
  loss_mask: Any = None
  """1 where a token is trained on and scored (fine-tuning: the responses); None: every
  target."""


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Which document each token of a row belongs to, numbered from 1 in every row.

  A document's EOS belongs to it and the next token starts a new segment. sentencepiece
  never emits the EOS id for text, so EOS marks every document end and nothing else;
  the ids follow from the tokens alone and need no state.
  """
  ends = (tokens == eos_id).astype(np.int32)
  out = np.ones(tokens.shape, np.int32)
  out[..., 1:] += np.cumsum(ends[..., :-1], axis=-1, dtype=np.int32)
  return out


def make_batch(rows: np.ndarray, eos_id: int, with_segments: bool) -> Batch:
  """Packed rows as the trainer takes them.

  Windows (B, T + 1) give their tokens, with their segment ids when `with_segments`
  (data.segment_ids). data/packing.py's RowPacker rows (B, T + 1, 3) hold the tokens,
  the loss mask and the example numbers the packer gave, in that order.
  """
  if rows.ndim == 3:
    return Batch(rows[..., 0], segment_ids=rows[..., 2], loss_mask=rows[..., 1])
  return Batch(rows, segment_ids=segment_ids(rows, eos_id) if with_segments else None)
