"""Reading a Hugging Face folder: its config.json as our model.* keys, checked against a
model config, and its safetensors as our parameters (the mapping is lm/export/hf.py's).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.export import hf_moe
from lm.export.hf import INDEX, SAFETENSORS, Params, from_hf
from lm.model.config import ModelConfig

# HF config key -> our model.* key, for the keys that shape the parameters.
_CONFIG_KEYS = {'vocab_size': 'vocab_size', 'hidden_size': 'd_model',
                'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
                'intermediate_size': 'd_ff', 'rms_norm_eps': 'norm_eps'}


def hf_model_config(path: str) -> dict[str, Any]:
  """Our model.* keys for the LlamaForCausalLM (or Qwen3MoeForCausalLM) in folder `path`
  (from its config.json)."""
  c = _read_json(os.path.join(path, 'config.json'))

  def unsupported(key: str, why: str) -> ValueError:
    return ValueError(f'{path}/config.json: {key}: {why}')

  arch = c.get('model_type')
  if arch not in ('llama', hf_moe.MODEL_TYPE):
    raise unsupported('model_type', f"expected 'llama' or '{hf_moe.MODEL_TYPE}', got "
                      f'{arch!r}')
  for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if c.get(key, want) != want:
      raise unsupported(key, f'only {want!r} is supported, got {c[key]!r}')
  rope = {**(c.get('rope_scaling') or {}), **(c.get('rope_parameters') or {})}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ('default', 'llama3'):
    raise unsupported('rope_parameters', f"only rope_type 'default' and 'llama3' are "
                      f'supported, got {rope}')
  missing = [k for k in _CONFIG_KEYS if c.get(k) is None]
  if missing:
    raise unsupported(missing[0], 'missing')
  out = {ours: c[theirs] for theirs, ours in _CONFIG_KEYS.items()}
  out['num_kv_heads'] = c.get('num_key_value_heads') or c['num_attention_heads']
  head_dim = c.get('head_dim') or c['hidden_size'] // c['num_attention_heads']
  out['head_dim'] = 0 if head_dim * c['num_attention_heads'] == c['hidden_size'] else head_dim
  out['rope_theta'] = float(rope.get('rope_theta', c.get('rope_theta', 10000.0)))
  if kind == 'llama3':
    needs = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
    if [k for k in needs if k not in rope]:
      raise unsupported('rope_parameters', f"rope_type 'llama3' needs {', '.join(needs)}, got "
                        f'{rope}')
    out.update(rope_scaling=float(rope['factor']),
               rope_low_freq_factor=float(rope['low_freq_factor']),
               rope_high_freq_factor=float(rope['high_freq_factor']),
               rope_original_max_position=int(rope['original_max_position_embeddings']))
  out['tie_embeddings'] = bool(c.get('tie_word_embeddings', False))
  if arch == hf_moe.MODEL_TYPE:
    out.update(hf_moe.model_keys(c, unsupported))
  return out


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ValueError(f'no such file: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON: {e}') from e


def check_compatible(path: str, model_cfg: ModelConfig) -> None:
  """Raises naming the first model.* key that differs from the folder's config.json."""
  for key, value in hf_model_config(path).items():
    ours = getattr(model_cfg, key)
    if key == 'head_dim':  # 0 means d_model // num_heads on both sides.
      ours, value = model_cfg.head_size, value or model_cfg.d_model // model_cfg.num_heads
    if key == 'moe':  # The keys the folder states; the rest are training settings.
      for sub, want in value.items():
        have = getattr(model_cfg.moe, sub)
        if sub == 'expert_d_ff':
          have = model_cfg.moe.width(model_cfg.d_ff)
        if have != want:
          raise ValueError(f'model.moe.{sub}={have} does not match {path}/config.json, '
                           f'which needs model.moe.{sub}={want}')
      continue
    if ours != value:
      raise ValueError(f'model.{key}={ours} does not match {path}/config.json, which needs '
                       f'model.{key}={value}')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF folder: model.safetensors or the shards its index names."""
  from safetensors.numpy import load_file

  if not os.path.isdir(path):
    raise ValueError(f'no such folder: {path}')
  single, index = os.path.join(path, SAFETENSORS), os.path.join(path, INDEX)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index}: no weight_map')
    files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    for f in files:
      if not os.path.isfile(f):
        raise ValueError(f'{index} names a shard that does not exist: {f}')
  else:
    raise ValueError(f'{path}: neither {SAFETENSORS} nor {INDEX} (only safetensors '
                     'checkpoints are read; re-save with save_pretrained(safe_serialization=True))')
  out: dict[str, np.ndarray] = {}
  for f in files:
    try:
      out.update(load_file(f))
    except Exception as e:  # noqa: BLE001  safetensors' own error type: a torn or foreign file.
      why = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f'cannot read {f}: {why}') from e
  return out


def load_hf(path: str, model_cfg: ModelConfig, like: Any = None) -> Params:
  """Params from a local Hugging Face Llama folder, checked against model_cfg.

  Without `like`: numpy arrays in model.param_dtype. With `like` (a params tree of
  jax arrays, e.g. a freshly initialised train state's): each tensor takes that leaf's
  dtype and sharding; every process reads the files and places its own devices' slices.
  """
  check_compatible(path, model_cfg)
  params = from_hf(read_safetensors(path), model_cfg)
  if like is None:
    dtype = jnp.dtype(model_cfg.param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype), params)

  def place(x, ref):
    x = x.astype(ref.dtype)
    return jax.make_array_from_callback(x.shape, ref.sharding, lambda index: x[index])

  return jax.tree.map(place, params, like)
