"""The llama_7b shape at 128k tokens a row: each row split over 8 devices (mesh.context).

For 64 devices (8-way fsdp x 8-way context, a row per fsdp group); on 8 devices set
batch_size=1. Positions past the 4,096 that llama_7b trains at are read through Llama 3's
RoPE scaling, so a run that `init_from`s a llama_7b checkpoint extends it.
`scripts/bench.py --aot` plans it on a CPU (docs/performance.md).
"""

import ml_collections

from configs import llama_7b


def get_config() -> ml_collections.ConfigDict:
  c = llama_7b.get_config()
  c.name = 'llama_7b_long'
  c.workdir = 'runs/llama_7b_long'
  c.seq_len = 131072
  c.batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.context = 8
  c.model.rope_scaling = 32.0
  c.model.rope_original_max_position = 4096
  c.data.segment_ids = True
  return c
