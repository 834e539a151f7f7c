"""The Qwen3-30B-A3B shape (30.5B parameters, 3.3B active): 48 layers, d=2048, 32 query
and 4 kv heads of 128, QK-norm, every layer a mixture of 128 experts of width 768, 8
per token, T=4096. It exports to Hugging Face as Qwen3MoeForCausalLM.

Meant for many devices, experts split over `mesh.expert` and FSDP over the rest;
`scripts/bench.py --aot` tells whether it fits (docs/performance.md).
"""

import ml_collections

from configs import llama_1b


def get_config() -> ml_collections.ConfigDict:
  c = llama_1b.get_config()
  c.name = 'qwen3_30b_a3b'
  c.workdir = 'runs/qwen3_30b_a3b'
  c.batch_size = 64
  c.seq_len = 4096
  c.mesh.fsdp = -1
  c.mesh.expert = 8
  c.model.vocab_size = 151936
  c.model.d_model = 2048
  c.model.num_layers = 48
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.head_dim = 128
  c.model.d_ff = 6144  # Qwen3's dense width; unused while every layer has experts.
  c.model.qk_norm = True
  c.model.norm_eps = 1e-6
  c.model.rope_theta = 1e6
  c.model.moe.num_experts = 128
  c.model.moe.experts_per_token = 8
  c.model.moe.expert_d_ff = 768
  c.model.moe.aux_loss = 0.001  # Qwen3-MoE's router_aux_loss_coef.
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  return c
