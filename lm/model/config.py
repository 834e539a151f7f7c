"""The model's config: `ModelConfig`, the `model.*` keys (and `LossConfig`, the `loss.*`
keys), validated whenever one is made.

lm/model/transformer.py builds the Transformer from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

MLPS = ('swiglu', 'relu2')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTIONS = ('auto', 'xla', 'cudnn')
CONTEXT_ATTENTIONS = ('ring', 'allgather')  # lm/model/context.py MODES
CONTEXT_ORDERS = ('zigzag', 'contiguous')  # lm/model/context.py ORDERS
ROUTERS = ('softmax', 'sigmoid')
MOE_IMPLS = ('ragged', 'capacity')  # lm/model/experts.py
# model.moe.* keys that say how the experts are computed or trained, not what the
# parameters are: a resume may change them, and every export format expresses them.
MOE_RUNTIME_KEYS = ('impl', 'capacity_factor', 'aux_loss', 'z_loss')


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The `model.moe.*` keys: a mixture of experts in place of the MLP (lm/model/moe.py).
  Off (num_experts=0) by default: a dense model's parameters and losses are unchanged."""

  num_experts: int = 0
  """Routed experts E in each MoE layer; 0 = a dense model."""
  experts_per_token: int = 2
  """Experts k each token is sent to, 1 <= k <= E."""
  expert_d_ff: int = 0
  """Each expert's SwiGLU hidden width; 0 = model.d_ff."""
  num_shared_experts: int = 0
  """Always-on experts (DeepSeek, Qwen2-MoE), one MLP of num_shared_experts x expert_d_ff."""
  router: str = 'softmax'
  """'softmax': top-k of a softmax (Mixtral, Qwen3-MoE); 'sigmoid': top-k of per-expert
  sigmoids (DeepSeek-V3). Either way the k weights are normalised to sum to 1."""
  first_dense_layers: int = 0
  """The first layers keep the dense MLP (DeepSeek-V3 has 3)."""
  every: int = 1
  """After those, every this many layers is MoE (1 = all of them)."""
  aux_loss: float = 0.0
  """Weight of the Switch / GShard load-balance loss E * sum_e f_e P_e, per layer
  (0.01 is usual); 0 = off."""
  z_loss: float = 0.0
  """Weight of the router z-loss mean(logsumexp(router logits)^2), per layer (ST-MoE
  uses 0.001); 0 = off."""
  bias_rate: float = 0.0
  """DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias, added to the scores
  for selection only, moves by this much against the sign of each expert's load error
  after every step (0.001 is theirs); 0 = off."""
  impl: str = 'ragged'
  """How experts run their rows (lm/model/experts.py): 'ragged' (grouped matmuls,
  jax.lax.ragged_dot) or 'capacity' (a fixed buffer per expert, batched einsums)."""
  capacity_factor: float = 0.0
  """Buffers of this many times the mean load per expert (and per device exchanged
  with), copies past them dropped; 0 = the worst case's size: dropless."""

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0

  def validate(self) -> None:
    """Raises ValueError('model.moe.KEY: why (got VALUE)') for the first bad key."""
    def bad(key, why):
      raise ValueError(f'model.moe.{key}: {why} (got {getattr(self, key)!r})')

    for key in ('num_experts', 'expert_d_ff', 'num_shared_experts', 'first_dense_layers'):
      if getattr(self, key) < 0:
        bad(key, 'must be >= 0')
    if not self.enabled:
      return
    if not 1 <= self.experts_per_token <= self.num_experts:
      bad('experts_per_token', f'must be in [1, num_experts={self.num_experts}]')
    if self.every < 1:
      bad('every', 'must be >= 1')
    if self.router not in ROUTERS:
      bad('router', f'expected one of {", ".join(ROUTERS)}')
    for key in ('aux_loss', 'z_loss', 'bias_rate', 'capacity_factor'):
      if getattr(self, key) < 0:
        bad(key, 'must be >= 0 (0 = off)')
    if self.impl not in MOE_IMPLS:
      bad('impl', f'expected one of {", ".join(MOE_IMPLS)}')

  def width(self, d_ff: int) -> int:
    """The experts' hidden width."""
    return self.expert_d_ff or d_ff

  @classmethod
  def from_dict(cls, d: Mapping) -> MoEConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown config key model.moe.{unknown[0]}')
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model.*` keys: the architecture, its dtypes and how it is compiled."""

  vocab_size: int = 4096
  """Embedding rows; must be >= the tokenizer's vocabulary."""
  d_model: int = 256
  """Residual stream width."""
  num_layers: int = 4
  """Transformer blocks."""
  num_heads: int = 8
  """Query heads."""
  num_kv_heads: int = 4
  """Key/value heads (grouped-query attention); must divide num_heads."""
  head_dim: int = 0
  """Per-head width; 0 = d_model // num_heads."""
  d_ff: int = 768
  """MLP hidden width."""
  dtype: str = 'float32'
  """Compute dtype: float32, bfloat16 (accelerators) or float16."""
  param_dtype: str = 'float32'
  """Storage dtype of the parameters and the optimizer state."""
  tie_embeddings: bool = True
  """The output head reuses the token embedding."""
  dropout: float = 0.0
  """Dropout on attention and MLP outputs, in [0, 1)."""
  remat: bool = False
  """Recompute block activations in the backward pass."""
  remat_policy: str = 'nothing_saveable'
  """With remat: what is kept, a jax.checkpoint_policies name."""
  scan_layers: bool = False
  """One compiled block scanned over the layers (fast compiles)."""
  rope_theta: float = 10000.0
  """RoPE base frequency."""
  rope_scaling: float = 0.0
  """Llama 3's RoPE frequency scaling, by this factor (Llama 3.1 uses 8), to extend a
  model trained at rope_original_max_position to longer rows; 0 = off."""
  rope_low_freq_factor: float = 1.0
  """rope_scaling: wavelengths above original max position / this are scaled whole."""
  rope_high_freq_factor: float = 4.0
  """rope_scaling: wavelengths below original max position / this are kept; between the
  two the scaling is blended."""
  rope_original_max_position: int = 8192
  """rope_scaling: the row length the model was trained at before the extension."""
  norm_eps: float = 1e-5
  """RMSNorm epsilon."""
  attention: str = 'auto'
  """'auto' (cuDNN's fused attention on a GPU in 16 bits, else XLA's), 'xla' or 'cudnn'."""
  context_attention: str = 'ring'
  """With mesh.context > 1: 'ring' (key/value blocks passed round the devices, an online
  softmax) or 'allgather' (every device gathers all keys and values); lm/model/context.py."""
  context_order: str = 'zigzag'
  """With mesh.context > 1, which tokens each device holds: 'zigzag' (chunks i and
  2n - 1 - i of 2n: equal causal work) or 'contiguous' (chunk i)."""
  # Architecture switches: each changes what the parameters mean, so a resume keeps it.
  qk_norm: bool = False
  """RMSNorm (its own gain over head_dim) on each head's queries and keys, before RoPE."""
  mlp: str = 'swiglu'
  """'swiglu' (gate, up, down) or 'relu2': relu(x up)^2 down, no gate."""
  zero_init_out: bool = False
  """Attention out and MLP down projections start at zero."""
  logit_softcap: float = 0.0
  """logits = cap * tanh(logits / cap) (Gemma 2 uses 30); 0 = off."""
  mup_base_width: int = 0
  """muP width transfer (lm/model/mup.py) from this d_model, m = d_model / it: the hidden
  matrices' Adam rate (and decay) / m, logits / m, attention logits / head_dim, so a rate
  tuned at this width holds at others (d_ff and the heads' width grow with d_model).
  0 = off."""
  moe: MoEConfig = MoEConfig()
  """Mixture of experts (`model.moe.*`); off by default."""

  def __post_init__(self) -> None:
    if isinstance(self.moe, Mapping):  # From a config dict or config.json.
      object.__setattr__(self, 'moe', MoEConfig.from_dict(self.moe))
    self.validate()  # Wherever a ModelConfig is made: parse, replace(), tests.

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i (from 0) has experts in place of the dense MLP."""
    m = self.moe
    return m.enabled and i >= m.first_dense_layers and (i - m.first_dense_layers) % m.every == 0

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def validate(self) -> None:
    """Raises ValueError('model.KEY: why (got VALUE)') for the first bad key."""
    def bad(key, why):
      raise ValueError(f'model.{key}: {why} (got {getattr(self, key)!r})')

    for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff'):
      if getattr(self, key) <= 0:
        bad(key, 'must be positive')
    if self.num_heads % self.num_kv_heads:
      bad('num_kv_heads', f'must divide num_heads={self.num_heads}')
    if not self.head_dim and self.d_model % self.num_heads:
      bad('num_heads', f'must divide d_model={self.d_model} (or set model.head_dim)')
    if self.head_size % 2:
      bad('head_dim', f'RoPE needs an even head size, here {self.head_size}')
    for key in ('dtype', 'param_dtype'):
      if getattr(self, key) not in DTYPES:
        bad(key, f'expected one of {", ".join(DTYPES)}')
    if self.attention not in ATTENTIONS:
      bad('attention', f'expected one of {", ".join(ATTENTIONS)}')
    if self.context_attention not in CONTEXT_ATTENTIONS:
      bad('context_attention', f'expected one of {", ".join(CONTEXT_ATTENTIONS)}')
    if self.context_order not in CONTEXT_ORDERS:
      bad('context_order', f'expected one of {", ".join(CONTEXT_ORDERS)}')
    if self.mlp not in MLPS:
      bad('mlp', f'expected one of {", ".join(MLPS)}')
    if self.rope_scaling and self.rope_scaling < 1:
      bad('rope_scaling', 'must be >= 1 (0 = off)')
    if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
      bad('rope_low_freq_factor', f'must be in (0, rope_high_freq_factor='
          f'{self.rope_high_freq_factor})')
    if self.rope_original_max_position <= 0:
      bad('rope_original_max_position', 'must be positive')
    if self.logit_softcap < 0:
      bad('logit_softcap', 'must be >= 0 (0 = off)')
    if self.mup_base_width < 0:
      bad('mup_base_width', 'must be >= 0 (0 = off)')
    if not 0.0 <= self.dropout < 1.0:
      bad('dropout', 'must be in [0, 1)')
    if not hasattr(jax.checkpoint_policies, self.remat_policy):
      bad('remat_policy', 'not a jax.checkpoint_policies name')
    if not isinstance(self.moe, MoEConfig):
      bad('moe', 'expected a section of model.moe.* keys')
    self.moe.validate()
    if self.moe.enabled:
      if self.mlp != 'swiglu':
        bad('mlp', "the experts of model.moe are SwiGLU MLPs; use 'swiglu' with them")
      mixed = {self.is_moe_layer(i) for i in range(self.num_layers)}
      if self.scan_layers and len(mixed) > 1:
        bad('scan_layers', 'scanned layers must all be alike, and model.moe.'
            'first_dense_layers / every make some dense: set scan_layers=False')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The `loss.*` keys: how the loss is computed, not what it is (so a resume may change
  them). The z-loss weight, a term of the objective, is `optimizer.z_loss`."""

  chunk: int = 0
  """Tokens per row in each chunk of the float32 loss and its gradient, so the whole
  B x T x V logits never exist; 0 = whole rows. Must divide seq_len."""

  def __post_init__(self) -> None:
    if self.chunk < 0:
      raise ValueError(f'loss.chunk: must be >= 0 (got {self.chunk!r})')

  def check_rows(self, seq_len: int) -> None:
    """The check against the run's seq_len (lm/config.py parse makes it)."""
    if self.chunk and self.chunk < seq_len and seq_len % self.chunk:
      # A chunk that does not divide the rows would shrink to a divisor, possibly 1 token.
      raise ValueError(f'loss.chunk: must divide seq_len={seq_len} (got {self.chunk!r})')
