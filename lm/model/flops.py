"""Parameter counts, FLOPs per token and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import math
from typing import Any

import jax

from lm.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by substrings of `jax.Device.device_kind`.
# Checked in order, so more specific names come first.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('GH200', 989e12),
    ('B200', 2250e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('A10G', 70e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """bf16 peak of one device, or None where unknown (CPUs, unlisted accelerators)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in BF16_PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def num_params(cfg: ModelConfig, *, active: bool = False) -> int:
  """Parameters of the model, from its shape alone. `active`: those one token uses, an
  MoE layer's k routed experts (with its router and shared experts) instead of all E."""
  d, h, m = cfg.d_model, cfg.head_size, cfg.moe
  attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  dense_mlp = (3 if cfg.mlp == 'swiglu' else 2) * d * cfg.d_ff
  routed = m.experts_per_token if active else m.num_experts
  expert = 3 * d * m.width(cfg.d_ff)
  moe_mlp = d * m.num_experts + _bias(cfg) + (routed + m.num_shared_experts) * expert
  norms = 2 * d + (2 * h if cfg.qk_norm else 0)
  blocks = sum(attn + norms + (moe_mlp if cfg.is_moe_layer(i) else dense_mlp)
               for i in range(cfg.num_layers))
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return blocks + embed + d


def active_params(cfg: ModelConfig) -> int:
  """Parameters one token passes through (num_params for a dense model)."""
  return num_params(cfg, active=True)


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul for every token: the active ones (an MoE
  layer's router, shared and k routed experts).

  The input embedding is a lookup and costs nothing; a tied embedding still counts once
  because it is the output head. The router bias is an addition, not a matmul.
  """
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  biases = _bias(cfg) * sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  return active_params(cfg) - lookup - biases


def _bias(cfg: ModelConfig) -> int:
  """An MoE layer's router bias (model.moe.bias_rate): E numbers, or none."""
  return cfg.moe.num_experts if cfg.moe.bias_rate else 0


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
  """Training FLOPs per token (forward + backward).

  PaLM (appendix B): 6N + 12·L·H·Q·T, with attention scores over the whole window.
  With causal=True the attention term is halved (6·L·H·Q·T = 6·L·d·T when H·Q = d):
  the work a causal kernel really has to do.
  """
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
  return 6 * matmul_params(cfg) + (attn / 2 if causal else attn)


def mfu(tokens_per_sec: float, cfg: ModelConfig, seq_len: int, num_devices: int,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation against the devices' bf16 peak; None when unknown."""
  if peak is None:
    return None
  return tokens_per_sec * flops_per_token(cfg, seq_len) / (peak * num_devices)
