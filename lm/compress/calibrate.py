"""Calibration for pruning: rows of a run's own training split, and what the model's
projections read from them.

`projection_inputs` runs the model unscanned (so every block's sown values come back,
lm/model/transformer.py's KERNEL_INPUTS) and, for structured pruning, also each block's
output, the residual stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from data.pipeline import TrainBatches
from lm.model.config import ModelConfig
from lm.model.transformer import KERNEL_INPUTS, Block, Transformer
from lm.run.folder import Run


def calibration_rows(run: Run, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(tokens, segment ids) of the first `rows` training rows the run itself read."""
  cfgs = run.cfgs
  with TrainBatches(cfgs.data, run.tokenizer, rows, cfgs.run.seq_len, seed=cfgs.run.seed,
                    prefetch=0) as batches:
    batch = next(batches)
  segments = None if batch.segment_ids is None else np.asarray(batch.segment_ids)[:, :-1]
  return np.asarray(batch.tokens)[:, :-1], segments


def _block_outputs(mdl: nn.Module, method: str) -> bool:
  return method == '__call__' and isinstance(mdl, Block)


def projection_inputs(cfg: ModelConfig, *, block_outputs: bool = False
                      ) -> Callable[..., Any]:
  """Jitted (unscanned params, tokens, segment ids) -> every block's sown projection
  inputs, or with `block_outputs` (those, the blocks' captured intermediates)."""
  model = Transformer(dataclasses.replace(cfg, scan_layers=False, remat=False))
  collections = [KERNEL_INPUTS] + (['intermediates'] if block_outputs else [])

  def run(params, tokens, segments):
    _, state = model.apply({'params': params}, tokens, segment_ids_BxT=segments,
                           mutable=collections,
                           capture_intermediates=_block_outputs if block_outputs else False)
    if block_outputs:
      return state[KERNEL_INPUTS], state['intermediates']
    return state[KERNEL_INPUTS]

  return jax.jit(run)


def hessian(x: jax.Array) -> np.ndarray:
  """X^T X over every calibration token, in float64; heads (B, T, N, H) flattened as the
  o projection's inputs are (N * H)."""
  x = np.asarray(x, np.float64)
  x = x.reshape(-1, x.shape[-1] * (x.shape[-2] if x.ndim == 4 else 1))
  return x.T @ x
