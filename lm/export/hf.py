"""Hugging Face interop: our parameters <-> a `LlamaForCausalLM` folder.

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

from lm.model import flops
from lm.model.config import ModelConfig
from lm.model.params import unstack_layers

Params = dict[str, Any]
_LAYER = 'model.layers.{}.'
_SAFETENSORS = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
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
    (('mlp', 'gate'), 'mlp.gate_proj.weight', lambda x: x.T, lambda x, s: x.T),
    (('mlp', 'up'), 'mlp.up_proj.weight', lambda x: x.T, lambda x, s: x.T),
    (('mlp', 'down'), 'mlp.down_proj.weight', lambda x: x.T, lambda x, s: x.T),
)


# model.* keys a Llama config.json states (the shape, RoPE, norm epsilon, tying).
_EXPRESSED = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
              'd_ff', 'rope_theta', 'norm_eps', 'tie_embeddings', 'rope_scaling',
              'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_position')
# Training, compute and initialisation settings: they do not change what trained
# parameters compute, so every format expresses them (lm/export/gguf_export.py too).
NOT_IN_MODEL = ('dtype', 'param_dtype', 'dropout', 'remat', 'remat_policy', 'scan_layers',
                'attention', 'zero_init_out', 'context_attention', 'context_order')


def check_expressible(model_cfg: ModelConfig, expressed: Iterable[str] = _EXPRESSED,
                       fmt: str = 'the Hugging Face Llama format',
                       needs: str = 'export and import need') -> None:
  """Raises naming the first model.* key a format cannot express: any key off its
  default but the `expressed` ones and NOT_IN_MODEL (for a Hugging Face Llama: QK-norm,
  the ReLU-squared MLP, logit soft-capping). GGUF's export passes its own."""
  defaults = type(model_cfg)()
  for field in dataclasses.fields(model_cfg):
    key = field.name
    if key in expressed or key in NOT_IN_MODEL:
      continue
    value, default = getattr(model_cfg, key), getattr(defaults, key)
    if value != default:
      raise ValueError(f'model.{key}={value!r}: {fmt} has no counterpart; {needs} the '
                       f'default {default!r}')


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
    block = params[f'block_{i}']
    for (module, name), hf_name, fwd, _ in _BLOCK_MAP:
      out[_LAYER.format(i) + hf_name] = np.ascontiguousarray(fwd(cast(block[module][name])))
  out['model.norm.weight'] = cast(params['final_norm']['scale'])
  if not model_cfg.tie_embeddings:
    out['lm_head.weight'] = np.ascontiguousarray(cast(params['head']).T)
  return out


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name a LlamaForCausalLM of this shape holds, with its shape."""
  s, F, V = _dims(model_cfg), model_cfg.d_ff, model_cfg.vocab_size
  layer = {'input_layernorm.weight': (s.D,), 'post_attention_layernorm.weight': (s.D,),
           'self_attn.q_proj.weight': (s.N * s.H, s.D),
           'self_attn.k_proj.weight': (s.K * s.H, s.D),
           'self_attn.v_proj.weight': (s.K * s.H, s.D),
           'self_attn.o_proj.weight': (s.D, s.N * s.H),
           'mlp.gate_proj.weight': (F, s.D), 'mlp.up_proj.weight': (F, s.D),
           'mlp.down_proj.weight': (s.D, F)}
  out = {'model.embed_tokens.weight': (V, s.D), 'model.norm.weight': (s.D,)}
  for i in range(model_cfg.num_layers):
    out.update({_LAYER.format(i) + k: v for k, v in layer.items()})
  if not model_cfg.tie_embeddings:
    out['lm_head.weight'] = (V, s.D)
  return out


def from_hf(state_dict: Mapping[str, Any], model_cfg: ModelConfig) -> Params:
  """A LlamaForCausalLM state dict -> our params (numpy), the inverse of `to_hf`.

  Scanned (`blocks`) when model_cfg.scan_layers. Arrays keep the state dict's dtype.
  """
  check_expressible(model_cfg)
  state_dict = _checked(state_dict, model_cfg)
  dims = _dims(model_cfg)
  params: Params = {'embed': np.asarray(state_dict['model.embed_tokens.weight']),
                    'final_norm': {'scale': np.asarray(state_dict['model.norm.weight'])}}
  for i in range(model_cfg.num_layers):
    block: Params = {}
    for (module, name), hf_name, _, back in _BLOCK_MAP:
      x = np.asarray(state_dict[_LAYER.format(i) + hf_name])
      block.setdefault(module, {})[name] = np.ascontiguousarray(back(x, dims))
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
                     'for a Llama model of this config')
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
  """The config.json of the equivalent LlamaForCausalLM."""
  from data import tokenizer as tok  # The ids every tokenizer trained here uses.

  rope = {'rope_type': 'default', 'rope_theta': float(model_cfg.rope_theta)}
  scaling = None
  if model_cfg.rope_scaling:  # transformers' rope_type 'llama3'.
    scaling = {'rope_type': 'llama3', 'factor': float(model_cfg.rope_scaling),
               'low_freq_factor': float(model_cfg.rope_low_freq_factor),
               'high_freq_factor': float(model_cfg.rope_high_freq_factor),
               'original_max_position_embeddings': model_cfg.rope_original_max_position}
    rope = {**rope, **scaling}
  return {
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


def _token_id(given: int | None, default: int) -> int | None:
  # sentencepiece reports a role it lacks as -1; HF wants null.
  value = default if given is None else given
  return value if value >= 0 else None


# HF config key -> our model.* key, for the keys that shape the parameters.
_CONFIG_KEYS = {'vocab_size': 'vocab_size', 'hidden_size': 'd_model',
                'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
                'intermediate_size': 'd_ff', 'rms_norm_eps': 'norm_eps'}


def hf_model_config(path: str) -> dict[str, Any]:
  """Our model.* keys for the LlamaForCausalLM in folder `path` (from its config.json)."""
  c = _read_json(os.path.join(path, 'config.json'))

  def unsupported(key: str, why: str) -> ValueError:
    return ValueError(f'{path}/config.json: {key}: {why}')

  if c.get('model_type') != 'llama':
    raise unsupported('model_type', f"expected 'llama', got {c.get('model_type')!r}")
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
    if ours != value:
      raise ValueError(f'model.{key}={ours} does not match {path}/config.json, which needs '
                       f'model.{key}={value}')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF folder: model.safetensors or the shards its index names."""
  from safetensors.numpy import load_file

  if not os.path.isdir(path):
    raise ValueError(f'no such folder: {path}')
  single, index = os.path.join(path, _SAFETENSORS), os.path.join(path, _INDEX)
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
    raise ValueError(f'{path}: neither {_SAFETENSORS} nor {_INDEX} (only safetensors '
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
  weights = os.path.join(out_dir, _SAFETENSORS)
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
