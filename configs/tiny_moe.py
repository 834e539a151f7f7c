"""tiny with a mixture of experts: 8 experts, 2 per token, each a quarter of tiny's MLP
width... so a token's MLP compute is tiny's, with four times the MLP parameters."""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = 'tiny_moe'
  c.workdir = 'runs/tiny_moe'
  c.model.moe.num_experts = 8
  c.model.moe.experts_per_token = 2
  c.model.moe.expert_d_ff = 384  # 2 x 384 = tiny's d_ff: the same active MLP.
  c.model.moe.aux_loss = 0.01
  return c
