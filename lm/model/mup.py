"""Width transfer (muP: Yang et al., Tensor Programs V) for Adam: `model.mup_base_width`.

With the width multiplier m = d_model / mup_base_width, as in Microsoft's `mup` package
(MuReadout, MuAdam) and the practitioner's guides that follow it:
- hidden matrices (attention q, k, v, o; MLP gate, up, down): init std ~ 1/sqrt(fan_in),
  which the model's fan-in init already is; Adam rate lr / m. AdamW's decoupled decay is
  multiplied by the rate, so theirs is scaled by 1/m as well (as torch AdamW per group).
- token embedding and norm gains: init and rate unchanged (width-independent).
- output: logits times 1/m. The multiplier is folded into the head matrix
  (`transformer.output_head`), so the chunked loss and evaluation see it too. An untied
  head starts at std 1/sqrt(mup_base_width), the base's fan-in std at every width, with its
  rate unchanged; a tied head is the embedding, whose init does not depend on width.
- attention logits scaled like 1 / head_dim instead of 1 / sqrt(head_dim): once queries
  and keys are correlated by training their dot products grow like head_dim, not its
  square root. The constant is the one that makes the base width's model the standard
  model, sqrt(H0) / H with H0 the head size at the base width (`mup`'s attn_mult, set so),
  so that at m = 1 muP is exactly the standard parametrisation and a rate tuned there
  without muP is the rate to transfer. With head_dim fixed and heads growing it is 1 /
  sqrt(head_dim) at every width.
- With optimizer.name=muon the hidden matrices are Muon's, whose updates are already
  scaled for width (orthogonalised, times sqrt(max(1, fan_out / fan_in))); the AdamW part
  holds no hidden matrix, so only the init, the output multiplier and the attention scale
  apply.

One m serves every hidden matrix: d_ff and num_heads * head_dim are meant to grow with
d_model (with head_dim fixed and heads growing, or the other way round).
mup_base_width=0 (the default) is off: every function here is then the identity.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from lm.model.config import ModelConfig
from lm.optim.optimizer import muon_dimensions


def width_mult(cfg: ModelConfig) -> float:
  """m = d_model / mup_base_width; 1 when off."""
  return cfg.d_model / cfg.mup_base_width if cfg.mup_base_width else 1.0


def output_mult(cfg: ModelConfig) -> float:
  """The logits' multiplier, 1 / m."""
  return 1.0 / width_mult(cfg)


def head_init_scale(cfg: ModelConfig) -> float:
  """Variance scale of the untied head's fan-in init: m, so its std is 1/sqrt(base)."""
  return width_mult(cfg)


def attention_scale(cfg: ModelConfig) -> float | None:
  """Softmax scale of the attention logits, sqrt(H0) / H; None (off): 1/sqrt(H)."""
  if not cfg.mup_base_width:
    return None
  # The head size at the base width: a fixed head_dim, else d_model's share per head.
  base_head = cfg.head_dim or cfg.mup_base_width / cfg.num_heads
  return math.sqrt(base_head) / cfg.head_size


def is_hidden_matrix(names: tuple[str | None, ...]) -> bool:
  """A matrix from the residual stream to a hidden width or back: Muon's own matrices."""
  return muon_dimensions(names) is not None


def _is_names(x: Any) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def lr_scales(cfg: ModelConfig, param_axes: Any) -> Any:
  """Adam's per-parameter rate multiplier (1/m for hidden matrices, else 1), a tree like
  `param_axes` (lm/model/params.py param_axes); None when off, so the optimizer stays as it was."""
  if not cfg.mup_base_width:
    return None
  hidden = 1.0 / width_mult(cfg)
  return jax.tree.map(lambda names: hidden if is_hidden_matrix(names) else 1.0, param_axes,
                      is_leaf=_is_names)
