"""The model's config: `ModelConfig`, the `model.*` keys, validated when made from a dict.

lm/model/transformer.py builds the Transformer from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

MLPS = ('swiglu', 'relu2')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 4096
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 0  # 0 = d_model // num_heads
  d_ff: int = 768
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  tie_embeddings: bool = True
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  attention: str = 'auto'
  qk_norm: bool = False  # RMSNorm (own scale over head_dim) on queries and keys before RoPE.
  mlp: str = 'swiglu'  # 'swiglu' (gate, up, down) or 'relu2' (relu(x up)^2 down).
  zero_init_out: bool = False  # Attention out and MLP down projections start at zero.
  logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0 = off.
  mup_base_width: int = 0  # muP width transfer from this d_model (lm/model/mup.py); 0 = off.

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    cfg = cls(**dict(d))
    cfg.validate()
    return cfg

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self) -> None:
    def bad(key, why):
      raise ValueError(f'model.{key}: {why}')

    for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff'):
      if getattr(self, key) <= 0:
        bad(key, f'must be positive, got {getattr(self, key)}')
    if self.num_heads % self.num_kv_heads:
      bad('num_kv_heads', f'{self.num_kv_heads} does not divide num_heads={self.num_heads}')
    if not self.head_dim and self.d_model % self.num_heads:
      bad('num_heads', f'{self.num_heads} does not divide d_model={self.d_model}')
    if self.head_size % 2:
      bad('head_dim', f'RoPE needs an even head size, got {self.head_size}')
    for key in ('dtype', 'param_dtype'):
      if getattr(self, key) not in ('float32', 'bfloat16', 'float16'):
        bad(key, f'expected float32, bfloat16 or float16, got {getattr(self, key)!r}')
    if self.attention not in ('auto', 'xla', 'cudnn'):
      bad('attention', f"expected 'auto', 'xla' or 'cudnn', got {self.attention!r}")
    if self.mlp not in MLPS:
      bad('mlp', f"expected 'swiglu' or 'relu2', got {self.mlp!r}")
    if self.logit_softcap < 0:
      bad('logit_softcap', f'must be >= 0 (0 = off), got {self.logit_softcap}')
    if self.mup_base_width < 0:
      bad('mup_base_width', f'must be >= 0 (0 = off), got {self.mup_base_width}')
    if not 0.0 <= self.dropout < 1.0:
      bad('dropout', f'must be in [0, 1), got {self.dropout}')
    if not hasattr(jax.checkpoint_policies, self.remat_policy):
      bad('remat_policy', f'unknown jax.checkpoint_policies name {self.remat_policy!r}')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Config section `loss`: how the loss is computed, not what it is (so a resume may
  change it). The z-loss weight, a term of the objective, is `optimizer.z_loss`."""

  chunk: int = 0  # Tokens per row in each chunk of the float32 loss; 0 = whole rows.

  def validate(self, seq_len: int) -> None:
    if self.chunk < 0:
      raise ValueError(f'loss.chunk: must be >= 0, got {self.chunk}')
    if self.chunk and self.chunk < seq_len and seq_len % self.chunk:
      # A chunk that does not divide the rows would shrink to a divisor, possibly 1 token.
      raise ValueError(f'loss.chunk={self.chunk} does not divide seq_len={seq_len}')
