"""About 21 million parameters: tiny's recipe at twice the width and 1.5x the depth, the
largest that trains a few thousand steps in an hour or two on a 2-core CPU (docs/pruning.md)."""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = 'small'
  c.workdir = 'runs/small'
  c.steps = 3000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.model.d_model = 512
  c.model.num_layers = 6
  c.model.d_ff = 1536
  # AdamW, not tiny's Muon: at 8 x 128 tokens a step Muon's Newton-Schulz iterations on
  # these matrices cost more than the model's own forward and backward on a CPU (2.8x the
  # step time here), while on an accelerator's larger batches they are a few percent.
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 2e-3
  c.optimizer.min_lr = 2e-4
  return c
