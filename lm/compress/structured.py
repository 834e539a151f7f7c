"""Structured pruning: whole MLP units, key/value head groups and layers removed, into a
smaller dense model (a new ModelConfig) that loads, trains and exports like any other.

Importance is measured on activations, once, on the unpruned model and the run's own
training rows, as NVIDIA's Minitron does (Muralidharan et al., 2024):

  MLP unit j        mean |h_j| of its activation (the down projection's input)
  kv-head group k   the summed mean L2 norm of the attention outputs of the query heads
                    that read it (GQA keeps each group whole: its key and value heads and
                    their num_heads / num_kv_heads query heads)
  layer l           1 - mean cos(x_in, x_out) of the residual stream across the block
                    (ShortGPT's block influence): a layer that barely turns the stream
                    is the first to go

The most important units, groups and layers are kept, in their original order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lm.compress import calibrate
from lm.model.config import ModelConfig
from lm.model.transformer import embed_rows


@dataclasses.dataclass(frozen=True)
class Shape:
  """The kept sizes; 0 = keep the source's."""

  d_ff: int = 0
  num_kv_heads: int = 0
  num_layers: int = 0

  def resolve(self, cfg: ModelConfig) -> ModelConfig:
    """The pruned model's config; ValueError naming the flag for a size it cannot take."""
    out = {}
    for key, now in (('d_ff', cfg.d_ff), ('num_kv_heads', cfg.num_kv_heads),
                     ('num_layers', cfg.num_layers)):
      want = getattr(self, key) or now
      if not 0 < want <= now:
        raise ValueError(f'--{key} must be in [1, {now}] (the source has {now}), got {want}')
      out[key] = want
    if out == {'d_ff': cfg.d_ff, 'num_kv_heads': cfg.num_kv_heads,
               'num_layers': cfg.num_layers}:
      raise ValueError('--method=structured needs a smaller --d_ff, --num_kv_heads or '
                       '--num_layers')
    group = cfg.num_heads // cfg.num_kv_heads
    heads = out['num_kv_heads'] * group
    # Fewer heads: the head size is pinned, as with head_dim=0 it would follow
    # d_model / num_heads.
    head_dim = cfg.head_size if heads != cfg.num_heads else cfg.head_dim
    return dataclasses.replace(cfg, d_ff=out['d_ff'], num_kv_heads=out['num_kv_heads'],
                               num_heads=heads, num_layers=out['num_layers'],
                               head_dim=head_dim)


def importance(cfg: ModelConfig, params: dict[str, Any], tokens: np.ndarray,
               segments: np.ndarray | None) -> dict[str, np.ndarray]:
  """{'mlp': (L, d_ff), 'kv': (L, num_kv_heads), 'layers': (L,)} from one forward pass."""
  sown, inter = calibrate.projection_inputs(cfg, block_outputs=True)(params, tokens, segments)
  group = cfg.num_heads // cfg.num_kv_heads
  mlp, kv, layers = [], [], []
  x_in = np.asarray(embed_rows(params['embed'], tokens, np.float32, None), np.float64)
  for i in range(cfg.num_layers):
    name = f'block_{i}'
    h = np.asarray(sown[name]['mlp']['down'][0], np.float64)  # B, T, F
    mlp.append(np.abs(h).mean(axis=(0, 1)))
    heads = np.linalg.norm(np.asarray(sown[name]['attn']['o'][0], np.float64), axis=-1)
    kv.append(heads.mean(axis=(0, 1)).reshape(cfg.num_kv_heads, group).sum(axis=1))
    x_out = np.asarray(inter[name]['__call__'][0][0], np.float64)  # Block gives (x, None).
    cos = np.sum(x_in * x_out, -1) / (
        np.linalg.norm(x_in, axis=-1) * np.linalg.norm(x_out, axis=-1) + 1e-12)
    layers.append(1.0 - cos.mean())
    x_in = x_out
  return {'mlp': np.stack(mlp), 'kv': np.stack(kv), 'layers': np.array(layers)}


def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest scores, in increasing index order (ties: lower index)."""
  order = np.argsort(-scores, kind='stable')[:k]
  return np.sort(order)


def prune_structure(cfg: ModelConfig, new: ModelConfig, params: dict[str, Any],
                    scores: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the smaller model's unscanned params, what was kept: layers, and per kept layer
  the MLP units and kv groups)."""
  group = cfg.num_heads // cfg.num_kv_heads
  layers = _top(scores['layers'], new.num_layers)
  out = {k: v for k, v in params.items() if not k.startswith('block_')}
  kept: dict[str, Any] = {'layers': layers.tolist(), 'mlp_units': [], 'kv_groups': []}
  for j, i in enumerate(layers):
    block = jax.tree.map(np.asarray, params[f'block_{i}'])
    units = _top(scores['mlp'][i], new.d_ff)
    groups = _top(scores['kv'][i], new.num_kv_heads)
    q_heads = (groups[:, None] * group + np.arange(group)).reshape(-1)
    mlp = dict(block['mlp'])
    for name in ('gate', 'up'):
      if name in mlp:
        mlp[name] = mlp[name][:, units]
    mlp['down'] = mlp['down'][units, :]
    attn = dict(block['attn'])
    attn['q'] = attn['q'][:, q_heads]
    attn['k'], attn['v'] = attn['k'][:, groups], attn['v'][:, groups]
    attn['o'] = attn['o'][q_heads]
    out[f'block_{j}'] = {**block, 'mlp': mlp, 'attn': attn}
    kept['mlp_units'].append(units.tolist())
    kept['kv_groups'].append(groups.tolist())
  return out, kept
