"""A Llama-style decoder-only Transformer: training, evaluation, export and experiments.

Subpackages, from the bottom up (each imports only those above it in this list):
  model/        the Transformer, its config, muP, the loss, FLOP and parameter counts.
  optim/        AdamW and Muon, the learning-rate schedule, the optimizer config.
  run/          everything under RUN/: the folder layout, checkpoints and their checksums,
                the lock, train.log, metrics (JSON lines, TensorBoard, W&B).
  train/        the train state and step, where a run starts (resume), stops, the loop.
  eval/         perplexity and bits per byte, task scores, sampling, quantisation.
  export/       Hugging Face both ways, GGUF, the tokenizer as tokenizer.json.
  experiments/  sweeps, scaling fits, loss plots, the step benchmark.

What every subpackage shares stays here:
  config.py       the ConfigDict at the edge -> typed sections (`Configs`).
  mesh.py         `MeshConfig` and the device mesh; sharding.py maps logical axis names
                  onto it.
  distributed.py  jax.distributed start-up (flags or a detected cluster).
  cli.py          what the scripts share: flags, one-line errors, exit codes.
"""
