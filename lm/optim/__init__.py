"""Optimizers.

  config.py     OptimizerConfig (`optimizer.*`), validated.
  optimizer.py  AdamW or Muon with the schedule, clipping and the weight-decay mask;
                `muon_dimensions` says how Muon sees each matrix.
"""
