"""Hugging Face interop: our parameters <-> a `LlamaForCausalLM` folder, or for a
mixture of experts a `Qwen3MoeForCausalLM` one (lm/export/hf_moe.py).

The model is the Llama architecture already, so the mapping is names and transposes:
a torch Linear stores (out, in) where our kernels are (in, ...) with heads split out,
e.g. q (D, N, H) <-> q_proj.weight (N·H, D). Nothing is permuted: our RoPE is the
rotate-half layout Hugging Face uses, and query head n reads kv head n // (N / K) in
both (`repeat_kv` there, `dot_product_attention`'s grouping here).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.export import hf_moe
from lm.model import flops
from lm.model.config import ModelConfig, MoEConfig
from lm.model.params import unstack_layers

Params = dict[str, Any]
_LAYER = 'model.layers.{}.'
SAFETENSORS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
_DTYPES = ('float32', 'bfloat16', 'float16')

# (our path inside a block, HF name inside a layer, ours -> HF, HF -> ours given (D, N, K, H)).
_BLOCK_MAP: tuple[tuple[tuple[str, str], str, Callable, Callable], ...] = (
    (('attn_norm', 'scale'), 'input_layernorm.weight', lambda x: x, lambda x, s: x),
    (('attn', 'q'), 'self_attn.q_proj.weight',
     lambda x: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s.D, s.N, s.H)),
    (('attn', 'k'), 'self_attn.k_proj.weight',
     lambda x: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s.D, s.K, s.H)),
    (('attn', 'v'), 'self_attn.v_proj.weight',
     lambda x: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s.D, s.K, s.H)),
    (('attn', 'o'), 'self_attn.o_proj.weight',
     lambda x: x.reshape(-1, x.shape[-1]).T, lambda x, s: x.T.reshape(s.N, s.H, s.D)),
    (('mlp_norm', 'scale'), 'post_attention_layernorm.weight', lambda x: x, lambda x, s: x),
)
_QK_NORM_MAP = (
    (('attn', 'q_norm', 'scale'), 'self_attn.q_norm.weight', lambda x: x, lambda x, s: x),
    (('attn', 'k_norm', 'scale'), 'self_attn.k_norm.weight', lambda x: x, lambda x, s: x),
)
_DENSE_MLP_MAP = (
    (('mlp', 'gate'), 'mlp.gate_proj.weight', lambda x: x.T, lambda x, s: x.T),
    (('mlp', 'up'), 'mlp.up_proj.weight', lambda x: x.T, lambda x, s: x.T),
    (('mlp', 'down'), 'mlp.down_proj.weight', lambda x: x.T, lambda x, s: x.T),
)


# model.* keys a Llama config.json states (the shape, RoPE, norm epsilon, tying).
_EXPRESSED = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
              'd_ff', 'rope_theta', 'norm_eps', 'tie_embeddings', 'rope_scaling',
              'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_position')
# Qwen3-MoE states those, its experts (hf_moe checks model.moe.*) and needs QK-norm.
_MOE_EXPRESSED = _EXPRESSED + ('qk_norm', 'moe')
# Training, compute and initialisation settings: they do not change what trained
# parameters compute, so every format expresses them (lm/export/gguf_export.py too).
NOT_IN_MODEL = ('dtype', 'param_dtype', 'dropout', 'remat', 'remat_policy', 'scan_layers',
                'attention', 'zero_init_out', 'context_attention', 'context_order')


def check_expressible(model_cfg: ModelConfig, expressed: Iterable[str] | None = None,
                       fmt: str | None = None,
                       needs: str = 'export and import need') -> None:
  """Raises naming the first model.* key a format cannot express: any key off its
  default but the `expressed` ones and NOT_IN_MODEL (for a Hugging Face Llama: QK-norm,
  the ReLU-squared MLP, logit soft-capping, experts). GGUF's export passes its own.
  By default the format is Llama's, or Qwen3-MoE's for a model with experts."""
  moe = model_cfg.moe.enabled
  if expressed is None:
    expressed, fmt = (_MOE_EXPRESSED, hf_moe.FORMAT) if moe else (_EXPRESSED, _LLAMA)
    if moe:
      hf_moe.check_moe(model_cfg.moe, needs)
      if not model_cfg.qk_norm:
        raise ValueError(f'model.qk_norm=False: {fmt} normalises queries and keys; {needs} '
                         'model.qk_norm=True with model.moe')
  defaults = type(model_cfg)()
  for field in dataclasses.fields(model_cfg):
    key = field.name
    if key in expressed or key in NOT_IN_MODEL:
      continue
    value, default = getattr(model_cfg, key), getattr(defaults, key)
    if isinstance(value, MoEConfig) and value.enabled:
      raise ValueError(f'model.moe.num_experts={value.num_experts}: {fmt or _LLAMA} has no '
                       f'experts; {needs} a dense model (model.moe.num_experts=0)')
    if value != default:
      raise ValueError(f'model.{key}={value!r}: {fmt or _LLAMA} has no counterpart; {needs} '
                       f'the default {default!r}')


_LLAMA = 'the Hugging Face Llama format'


@dataclasses.dataclass(frozen=True)
class _Dims:
  D: int
  N: int
  K: int
  H: int


def _dims(cfg: ModelConfig) -> _Dims:
  return _Dims(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size)


def to_hf(params: Mapping[str, Any], model_cfg: ModelConfig,
          dtype: Any = None) -> dict[str, np.ndarray]:
  """Our params (scanned or not) -> a LlamaForCausalLM state dict of numpy arrays.

  `lm_head.weight` is left out for tied embeddings (config tie_word_embeddings=True).
  `dtype` (e.g. 'bfloat16') casts every tensor; None keeps each one's own.
  """
  check_expressible(model_cfg)
  if 'blocks' in params:
    params = unstack_layers(params, model_cfg.num_layers)
  cast = (lambda x: np.asarray(x)) if dtype is None else (
      lambda x: np.asarray(x).astype(jnp.dtype(dtype)))
  out = {'model.embed_tokens.weight': cast(params['embed'])}
  for i in range(model_cfg.num_layers):
    block, prefix = params[f'block_{i}'], _LAYER.format(i)
    for path, hf_name, fwd, _ in _layer_map(model_cfg, i):
      out[prefix + hf_name] = np.ascontiguousarray(fwd(cast(_get(block, path))))
    if model_cfg.is_moe_layer(i):
      out.update(hf_moe.layer_tensors(block['mlp'], prefix, cast))
  out['model.norm.weight'] = cast(params['final_norm']['scale'])
  if not model_cfg.tie_embeddings:
    out['lm_head.weight'] = np.ascontiguousarray(cast(params['head']).T)
  return out


def _layer_map(cfg: ModelConfig, i: int) -> tuple:
  """_BLOCK_MAP's entries for layer i: QK-norm's gains where set, the dense MLP's
  matrices unless the layer has experts (hf_moe maps those)."""
  return (_BLOCK_MAP + (_QK_NORM_MAP if cfg.qk_norm else ())
          + (() if cfg.is_moe_layer(i) else _DENSE_MLP_MAP))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a LlamaForCausalLM (Qwen3MoeForCausalLM) of this shape holds,
  with its shape."""
  s, F, V = _dims(model_cfg), model_cfg.d_ff, model_cfg.vocab_size
  layer = {'input_layernorm.weight': (s.D,), 'post_attention_layernorm.weight': (s.D,),
           'self_attn.q_proj.weight': (s.N * s.H, s.D),
           'self_attn.k_proj.weight': (s.K * s.H, s.D),
           'self_attn.v_proj.weight': (s.K * s.H, s.D),
           'self_attn.o_proj.weight': (s.D, s.N * s.H)}
  if model_cfg.qk_norm:
    layer.update({'self_attn.q_norm.weight': (s.H,), 'self_attn.k_norm.weight': (s.H,)})
  dense = {'mlp.gate_proj.weight': (F, s.D), 'mlp.up_proj.weight': (F, s.D),
           'mlp.down_proj.weight': (s.D, F)}
  out = {'model.embed_tokens.weight': (V, s.D), 'model.norm.weight': (s.D,)}
  for i in range(model_cfg.num_layers):
    prefix = _LAYER.format(i)
    out.update({prefix + k: v for k, v in layer.items()})
    if model_cfg.is_moe_layer(i):
      out.update(hf_moe.layer_shapes(model_cfg, prefix))
    else:
      out.update({prefix + k: v for k, v in dense.items()})
  if not model_cfg.tie_embeddings:
    out['lm_head.weight'] = (V, s.D)
  return out


def from_hf(state_dict: Mapping[str, Any], model_cfg: ModelConfig) -> Params:
  """A LlamaForCausalLM state dict -> our params (numpy), the inverse of `to_hf`.

  Scanned (`blocks`) when model_cfg.scan_layers. Arrays keep the state dict's dtype.
  """
  check_expressible(model_cfg)
  if model_cfg.moe.enabled:
    state_dict = hf_moe.per_expert(state_dict)
  state_dict = _checked(state_dict, model_cfg)
  dims = _dims(model_cfg)
  params: Params = {'embed': np.asarray(state_dict['model.embed_tokens.weight']),
                    'final_norm': {'scale': np.asarray(state_dict['model.norm.weight'])}}
  for i in range(model_cfg.num_layers):
    block: Params = {}
    prefix = _LAYER.format(i)
    for path, hf_name, _, back in _layer_map(model_cfg, i):
      x = np.asarray(state_dict[prefix + hf_name])
      node = block
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = np.ascontiguousarray(back(x, dims))
    if model_cfg.is_moe_layer(i):
      block['mlp'] = hf_moe.layer_params(state_dict, prefix, model_cfg)
    params[f'block_{i}'] = block
  if not model_cfg.tie_embeddings:
    params['head'] = np.ascontiguousarray(np.asarray(state_dict['lm_head.weight']).T)
  if model_cfg.scan_layers:
    # params.stack_layers' layout, stacked on the host: a big model may not fit one
    # device.
    layers = [params.pop(f'block_{i}') for i in range(model_cfg.num_layers)]
    params['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  return params


def _checked(state_dict: Mapping[str, Any], model_cfg: ModelConfig) -> Mapping[str, Any]:
  """Names and shapes as this config expects; a tied head may repeat the embedding."""
  want = expected_shapes(model_cfg)
  # Older exports keep RoPE's buffer; some tied checkpoints still store the head.
  extra = {k for k in state_dict if k not in want and not k.endswith('rotary_emb.inv_freq')}
  if model_cfg.tie_embeddings and 'lm_head.weight' in extra:
    if not np.array_equal(np.asarray(state_dict['lm_head.weight']),
                          np.asarray(state_dict.get('model.embed_tokens.weight'))):
      raise ValueError('lm_head.weight differs from model.embed_tokens.weight but '
                       'model.tie_embeddings=True; set it to False')
    extra.discard('lm_head.weight')
  if extra:
    raise ValueError(f'unexpected tensor {min(extra)} (and {len(extra) - 1} more) '
                     f'for a {"Qwen3-MoE" if model_cfg.moe.enabled else "Llama"} model of '
                     'this config')
  for name, shape in want.items():
    if name not in state_dict:
      raise ValueError(f'missing tensor {name}' + (
          ' (the checkpoint ties its embeddings: set model.tie_embeddings=True)'
          if name == 'lm_head.weight' else ''))
    got = tuple(np.shape(state_dict[name]))
    if got != shape:
      raise ValueError(f'tensor {name} has shape {got}, expected {shape} from the model config')
  return state_dict


def llama_config(model_cfg: ModelConfig, *, max_position_embeddings: int = 2048,
                 bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, dtype: str = 'float32') -> dict[str, Any]:
  """The config.json of the equivalent LlamaForCausalLM (Qwen3MoeForCausalLM)."""
  from data import tokenizer as tok  # The ids every tokenizer trained here uses.

  rope = {'rope_type': 'default', 'rope_theta': float(model_cfg.rope_theta)}
  scaling = None
  if model_cfg.rope_scaling:  # transformers' rope_type 'llama3'.
    scaling = {'rope_type': 'llama3', 'factor': float(model_cfg.rope_scaling),
               'low_freq_factor': float(model_cfg.rope_low_freq_factor),
               'high_freq_factor': float(model_cfg.rope_high_freq_factor),
               'original_max_position_embeddings': model_cfg.rope_original_max_position}
    rope = {**rope, **scaling}
  config = {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': model_cfg.vocab_size,
      'hidden_size': model_cfg.d_model,
      'intermediate_size': model_cfg.d_ff,
      'num_hidden_layers': model_cfg.num_layers,
      'num_attention_heads': model_cfg.num_heads,
      'num_key_value_heads': model_cfg.num_kv_heads,
      'head_dim': model_cfg.head_size,
      'hidden_act': 'silu',
      'rms_norm_eps': model_cfg.norm_eps,
      # transformers < 5 reads rope_theta, 5 reads rope_parameters.
      'rope_theta': float(model_cfg.rope_theta),
      'rope_parameters': rope,
      'rope_scaling': scaling,
      'max_position_embeddings': max_position_embeddings,
      'tie_word_embeddings': model_cfg.tie_embeddings,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'pretraining_tp': 1,
      'initializer_range': 0.02,
      'use_cache': True,
      'bos_token_id': _token_id(bos_id, tok.BOS_ID),
      'eos_token_id': _token_id(eos_id, tok.EOS_ID),
      'pad_token_id': _token_id(pad_id, tok.PAD_ID),
      'torch_dtype': dtype,
  }
  return hf_moe.config(config, model_cfg) if model_cfg.moe.enabled else config


def _token_id(given: int | None, default: int) -> int | None:
  # sentencepiece reports a role it lacks as -1; HF wants null.
  value = default if given is None else given
  return value if value >= 0 else None


def write_model(out_dir: str, params: Mapping[str, Any], model_cfg: ModelConfig, *,
                dtype: str = 'float32', max_position_embeddings: int = 2048,
                bos_id: int | None = None, eos_id: int | None = None,
                pad_id: int | None = None) -> int:
  """config.json, generation_config.json and model.safetensors; returns the tensor count."""
  import safetensors
  from safetensors.numpy import save_file

  check_dtype(dtype)
  tensors = to_hf(params, model_cfg, dtype)
  config = llama_config(model_cfg, max_position_embeddings=max_position_embeddings,
                        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype)
  generation = {k: config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, SAFETENSORS)
  try:
    save_file(tensors, weights, metadata={'format': 'pt'})
  except safetensors.SafetensorError as e:  # A read-only or full disk, in its own type.
    raise OSError(f'cannot write {weights}: {e}') from None
  os.chmod(weights, 0o644)  # safetensors creates it owner-only; a server may run as another user.
  for name, obj in (('config.json', config), ('generation_config.json', generation)):
    with open(os.path.join(out_dir, name), 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)
      f.write('\n')
  return flops.count_params(tensors)


def check_dtype(dtype: str) -> None:
  if dtype not in _DTYPES:
    raise ValueError(f'dtype: expected one of {", ".join(_DTYPES)}, got {dtype!r}')
