"""A 1.1B Llama (the TinyLlama shape): 22 layers, d=2048, 32 heads, 4 kv heads, T=2048.

Scanned layers keep compile time flat; remat lets it train on one 80 GB GPU.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = 'llama_1b'
  c.workdir = 'runs/llama_1b'
  c.steps = 50000
  c.batch_size = 16
  c.seq_len = 2048
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.model.vocab_size = 32000
  c.model.d_model = 2048
  c.model.num_layers = 22
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.d_ff = 5632
  c.model.dtype = 'bfloat16'
  c.loss.chunk = 256  # The float32 loss 256 tokens per row at a time: no full logits.
  c.model.tie_embeddings = False
  c.model.scan_layers = True
  c.model.remat = True
  c.model.remat_policy = 'dots_with_no_batch_dims_saveable'
  c.optimizer.lr = 4e-4
  c.optimizer.min_lr = 4e-5
  c.optimizer.warmup_steps = 2000
  return c
