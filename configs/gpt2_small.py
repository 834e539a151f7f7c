"""The GPT-2 small shape (124M): 12 layers, d=768, 12 heads, T=1024, vocab 50304.

SwiGLU with d_ff=2048 has the parameters of GPT-2's 4·d GELU MLP. bf16 compute with
float32 parameters and AdamW state: the accelerator default.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = 'gpt2_small'
  c.workdir = 'runs/gpt2_small'
  c.steps = 20000
  c.batch_size = 32
  c.seq_len = 1024
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.model.vocab_size = 50304  # 50257 rounded up to a multiple of 128 for the matmuls.
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.d_ff = 2048
  c.model.dtype = 'bfloat16'
  c.loss.chunk = 128  # The float32 loss 128 tokens per row at a time: no full logits.
  c.optimizer.lr = 6e-4
  c.optimizer.min_lr = 6e-5
  c.optimizer.warmup_steps = 700
  return c
