"""Every name under a run folder, spelled once: RUN/<name>. lm/run/folder.py has the tour.

Plain strings and no imports, so every module that touches a run folder (the lock, the
log, the metrics writers, checkpoints, plots, sweeps) can take its names from here.
"""

CONFIG = 'config.json'  # The resolved config, every key.
TOKENIZER = 'tokenizer.model'  # The sentencepiece model the run uses.
METRICS = 'metrics.jsonl'  # One JSON record per line: train and eval lines.
TENSORBOARD = 'tb'  # TensorBoard event files.
TRAIN_LOG = 'train.log'  # Library warnings and errors in full.
LOCK = '.lock'  # Held while a trainer runs in the folder.
WANDB_ID = 'wandb_id'  # The W&B run a resumed run continues.
CHECKPOINTS = 'checkpoints'  # checkpoints/<step>/: committed checkpoints.
CORRUPT = 'checkpoints.corrupt'  # Unreadable checkpoints, moved aside, never deleted.
