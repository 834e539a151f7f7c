"""Where each token is: its position in its document and RoPE's rotation of it.

RoPE rotates each query and key pair of dimensions by position x frequency; the
frequencies are theta^(-2i / H), or Llama 3's scaled ones for a context extension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.model.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """RoPE's H / 2 angular frequencies: theta^(-2i / H), with Llama 3's scaling when
  `rope_scaling` is set (low frequencies / factor, high ones kept, blended between)."""
  h = cfg.head_size
  freq_h = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if not cfg.rope_scaling:
    return freq_h
  factor, old = cfg.rope_scaling, cfg.rope_original_max_position
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelength_h = 2 * jnp.pi / freq_h
  smooth_h = jnp.clip((old / wavelength_h - low) / (high - low), 0.0, 1.0)
  return (1 - smooth_h) * freq_h / factor + smooth_h * freq_h


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float | jax.Array) -> jax.Array:
  """Rotary embedding in the rotate-half layout (the one Hugging Face Llama uses);
  `theta` is the base, or the frequencies themselves (`rope_frequencies`)."""
  h = x_BxTxNxH.shape[-1]
  freq_h = (theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
            if jnp.ndim(theta) == 0 else theta)
  angle_BxTxh = positions_BxT[..., None].astype(jnp.float32) * freq_h
  sin = jnp.sin(angle_BxTxh)[:, :, None, :]
  cos = jnp.cos(angle_BxTxh)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """Each token's position inside its segment: 0 at every change of segment id."""
  t = segment_ids_BxT.shape[1]
  index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BxT.shape)
  starts_BxT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], dtype=bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  first_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
  return index_BxT - first_BxT
