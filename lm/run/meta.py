"""What a checkpoint was made with (its `meta` item); whether another config may read it.

A resume must match every model and tokenizer key but those that change how the same
parameters are computed with; a fine-tune (init_from) may also change how positions are
read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lm.model.config import MOE_RUNTIME_KEYS, MoEConfig

META_VERSION = 1
# Model keys that change how the same parameters are computed with, not what they are:
# a resume or a fine-tune may change them. Every other model key must match.
RUNTIME_MODEL_KEYS = frozenset(
    {'dtype', 'param_dtype', 'remat', 'remat_policy', 'attention', 'dropout',
     'context_attention', 'context_order'})
# How positions are read, not what the parameters are: a fine-tune (init_from) may change
# them to extend the context the model reads; a resume may not.
POSITION_MODEL_KEYS = frozenset({'rope_theta', 'rope_scaling', 'rope_low_freq_factor',
                                 'rope_high_freq_factor', 'rope_original_max_position'})


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def make_metadata(model: Mapping[str, Any], tokenizer_sha256: str, tokenizer_vocab_size: int,
                  config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The `meta` item: what a checkpoint's parameters mean and how they were trained."""
  return {'version': META_VERSION, 'model': dict(model),
          'tokenizer': {'sha256': tokenizer_sha256, 'vocab_size': tokenizer_vocab_size},
          'config': dict(config or {})}


def _show(value: Any) -> str:
  return json.dumps(value) if isinstance(value, str) else str(value)


def incompatibilities(saved: Mapping[str, Any], now: Mapping[str, Any],
                      free: frozenset[str] = frozenset()) -> list[str]:
  """`key: X in checkpoint, Y now` for each model or tokenizer key that differs, but
  RUNTIME_MODEL_KEYS and the model keys in `free`.

  Keys recorded on only one side (an older checkpoint, a newer config key) are skipped.
  """
  out = []
  model_skip = RUNTIME_MODEL_KEYS | free | {f'moe.{k}' for k in MOE_RUNTIME_KEYS}
  for section, skip in (('model', model_skip), ('tokenizer', frozenset())):
    before, after = saved.get(section) or {}, now.get(section) or {}
    if section == 'model':
      before, after = _flat_model(before), _flat_model(after)
    for key in sorted((set(before) & set(after)) - skip):
      if before[key] != after[key]:
        out.append(f'{section}.{key}: {_show(before[key])} in checkpoint, '
                   f'{_show(after[key])} now')
  return out


def _flat_model(model: Mapping[str, Any]) -> dict[str, Any]:
  """The model keys with `moe` spelled out as moe.KEY; a checkpoint from before MoE
  existed was dense, the defaults."""
  out = {k: v for k, v in model.items() if k != 'moe'}
  if model:
    moe = {**dataclasses.asdict(MoEConfig()), **(model.get('moe') or {})}
    out.update({f'moe.{k}': v for k, v in moe.items()})
  return out
