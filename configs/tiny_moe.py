"""tiny with a mixture of experts (docs/moe.md): 8 experts of width 384, 2 per token, so
a token passes through as many MLP parameters as in tiny (d_ff 768) while the layer
holds four times as many. QK-norm on, so it exports as Hugging Face's Qwen3-MoE."""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = 'tiny_moe'
  c.workdir = 'runs/tiny_moe'
  c.model.qk_norm = True
  c.model.moe.num_experts = 8
  c.model.moe.experts_per_token = 2
  c.model.moe.expert_d_ff = 384  # 2 x 384 = tiny's d_ff: the same active MLP.
  c.model.moe.aux_loss = 0.01
  return c
