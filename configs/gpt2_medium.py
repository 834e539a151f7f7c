"""The GPT-2 medium shape (~355M): 24 layers, d=1024, 16 heads, T=1024."""

import ml_collections

from configs import gpt2_small


def get_config() -> ml_collections.ConfigDict:
  c = gpt2_small.get_config()
  c.name = 'gpt2_medium'
  c.workdir = 'runs/gpt2_medium'
  c.model.d_model = 1024
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.d_ff = 2736  # 3·d·d_ff ≈ GPT-2's 8·d², rounded to a multiple of 16.
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  return c
