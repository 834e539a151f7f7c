"""Hugging Face interop for mixtures of experts: the `Qwen3MoeForCausalLM` architecture.

Qwen3-MoE rather than Mixtral because it states everything our MoE layers can be that a
plain top-k softmax router implies: which layers are dense (`mlp_only_layers`), any E
and k, an expert width of its own (`moe_intermediate_size`) beside the dense layers'
(`intermediate_size`), and the normalised top-k weights (`norm_topk_prob`). Its
attention is Llama's with RMSNorm on each head's queries and keys before RoPE, which is
our `qk_norm`. What it has no place for: sigmoid routers, shared experts and the
router bias of auxiliary-loss-free balancing (model.moe.router, num_shared_experts,
bias_rate).

Experts are written one tensor each (`mlp.experts.J.gate_proj.weight`, ...), the layout
every transformers version reads: version 5 fuses them into `gate_up_proj` / `down_proj`
as it loads. Both layouts are read back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lm.model.config import MOE_RUNTIME_KEYS, ModelConfig, MoEConfig

ARCH = 'Qwen3MoeForCausalLM'
MODEL_TYPE = 'qwen3_moe'
FORMAT = 'the Hugging Face Qwen3-MoE format'
# model.moe.* keys it states; the rest must stay at their defaults but MOE_RUNTIME_KEYS.
_MOE_EXPRESSED = ('num_experts', 'experts_per_token', 'expert_d_ff', 'first_dense_layers',
                  'every')


def check_moe(moe: MoEConfig, needs: str) -> None:
  """Raises naming the first model.moe.* key Qwen3-MoE cannot express."""
  defaults = MoEConfig()
  for field in dataclasses.fields(moe):
    key = field.name
    if key in _MOE_EXPRESSED or key in MOE_RUNTIME_KEYS:
      continue
    value, default = getattr(moe, key), getattr(defaults, key)
    if value != default:
      raise ValueError(f'model.moe.{key}={value!r}: {FORMAT} has no counterpart; {needs} '
                       f'the default {default!r}')


def _experts(prefix: str, e: int) -> list[tuple[str, str, int]]:
  """(our name, HF tensor name, expert) for each expert's three matrices."""
  return [(ours, f'{prefix}mlp.experts.{j}.{theirs}_proj.weight', j)
          for j in range(e) for ours, theirs in (('gate', 'gate'), ('up', 'up'),
                                                 ('down', 'down'))]


def layer_tensors(mlp: Mapping[str, Any], prefix: str, cast: Callable) -> dict[str, np.ndarray]:
  """An MoE layer's router and experts as HF tensors (torch's (out, in) Linear layout)."""
  e = np.shape(mlp['router'])[1]
  out = {f'{prefix}mlp.gate.weight': np.ascontiguousarray(cast(mlp['router']).T)}
  for ours, name, j in _experts(prefix, e):
    out[name] = np.ascontiguousarray(cast(mlp[ours])[j].T)
  return out


def layer_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
  d, f, e = cfg.d_model, cfg.moe.width(cfg.d_ff), cfg.moe.num_experts
  out = {f'{prefix}mlp.gate.weight': (e, d)}
  for ours, name, _ in _experts(prefix, e):
    out[name] = (d, f) if ours == 'down' else (f, d)
  return out


def per_expert(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """transformers 5's fused `mlp.experts.gate_up_proj` (E, 2F, D) and `down_proj`
  (E, D, F) split into the per-expert tensors `layer_tensors` writes."""
  out = dict(state_dict)
  for name in [k for k in state_dict if k.endswith('mlp.experts.gate_up_proj')]:
    prefix = name[:-len('mlp.experts.gate_up_proj')]
    gate_up = np.asarray(out.pop(name))
    down = np.asarray(out.pop(f'{prefix}mlp.experts.down_proj'))
    f = gate_up.shape[1] // 2
    for j in range(gate_up.shape[0]):
      out[f'{prefix}mlp.experts.{j}.gate_proj.weight'] = gate_up[j, :f]
      out[f'{prefix}mlp.experts.{j}.up_proj.weight'] = gate_up[j, f:]
      out[f'{prefix}mlp.experts.{j}.down_proj.weight'] = down[j]
  return out


def layer_params(state_dict: Mapping[str, Any], prefix: str, cfg: ModelConfig) -> dict:
  """The inverse of layer_tensors: our `mlp` subtree of one MoE layer."""
  e = cfg.moe.num_experts
  stacked: dict[str, list] = {'gate': [None] * e, 'up': [None] * e, 'down': [None] * e}
  for ours, name, j in _experts(prefix, e):
    stacked[ours][j] = np.asarray(state_dict[name]).T
  out = {k: np.ascontiguousarray(np.stack(v)) for k, v in stacked.items()}
  out['router'] = np.ascontiguousarray(np.asarray(state_dict[f'{prefix}mlp.gate.weight']).T)
  return out


def config(llama: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The Qwen3-MoE config.json: the Llama one's keys plus the experts'."""
  m = cfg.moe
  dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
  out = {**llama, 'architectures': [ARCH], 'model_type': MODEL_TYPE,
         'num_experts': m.num_experts, 'num_experts_per_tok': m.experts_per_token,
         'moe_intermediate_size': m.width(cfg.d_ff), 'norm_topk_prob': True,
         'decoder_sparse_step': 1, 'mlp_only_layers': dense,
         'router_aux_loss_coef': m.aux_loss, 'output_router_logits': False,
         'use_sliding_window': False, 'sliding_window': None}
  for key in ('mlp_bias', 'pretraining_tp'):  # Llama's only.
    out.pop(key, None)
  return out


def model_keys(c: Mapping[str, Any], unsupported: Callable[[str, str], Exception]
               ) -> dict[str, Any]:
  """Our model.* keys that a Qwen3-MoE config.json adds to Llama's: qk_norm and moe."""
  if not c.get('norm_topk_prob', False) and c.get('num_experts_per_tok', 1) > 1:
    raise unsupported('norm_topk_prob', 'only normalised top-k weights (true) are supported')
  layers = c['num_hidden_layers']
  step = c.get('decoder_sparse_step', 1) or 1
  moe_layers = [i for i in range(layers) if i not in (c.get('mlp_only_layers') or [])
                and (i + 1) % step == 0]
  if not moe_layers:
    raise unsupported('mlp_only_layers', 'no layer has experts')
  first = moe_layers[0]
  every = moe_layers[1] - first if len(moe_layers) > 1 else 1
  if moe_layers != list(range(first, layers, every)):
    raise unsupported('mlp_only_layers', f'experts in layers {moe_layers}: only a first '
                      'dense stretch, then every n-th layer, is supported')
  # transformers 5 saves num_experts under its alias num_local_experts.
  experts = c.get('num_experts', c.get('num_local_experts'))
  if not experts:
    raise unsupported('num_experts', 'missing')
  return {'qk_norm': True, 'moe': {
      'num_experts': experts, 'experts_per_token': c['num_experts_per_tok'],
      'expert_d_ff': c['moe_intermediate_size'], 'first_dense_layers': first,
      'every': every}}
