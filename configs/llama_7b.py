"""The Llama-2-7B shape (6.7B): 32 layers, d=4096, 32 heads, d_ff=11008, T=4096.

Meant for many devices with FSDP; `scripts/bench.py --aot` tells whether it fits.
"""

import ml_collections

from configs import llama_1b


def get_config() -> ml_collections.ConfigDict:
  c = llama_1b.get_config()
  c.name = 'llama_7b'
  c.workdir = 'runs/llama_7b'
  c.batch_size = 8
  c.seq_len = 4096
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.d_ff = 11008
  c.model.remat_policy = 'nothing_saveable'
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  return c
