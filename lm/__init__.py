"""A Llama-style decoder-only Transformer: training, evaluation, export and experiments.

Subpackages, from the bottom up (each imports only those before it in this list, and
lm/'s own modules below):
  optim/        AdamW and Muon, the learning-rate schedule, the optimizer config.
  model/        the Transformer, its config, muP, the loss, the forward pass that
                training and evaluation share, FLOP and parameter counts.
  run/          everything under RUN/: the folder layout, loading a run, checkpoints and
                their checksums, the lock, train.log, metrics (JSON lines, TensorBoard,
                W&B).
  eval/         perplexity and bits per byte, task scores, sampling, quantisation.
  export/       Hugging Face both ways, GGUF, the tokenizer as tokenizer.json.
  train/        the train state and step, where a run starts (resume), stops, the loop,
                the training command.
  experiments/  sweeps, scaling fits, loss plots, the step benchmark.

What every subpackage shares stays here:
  config.py       the ConfigDict at the edge -> typed sections (`Configs`); imports no
                  Flax or optax.
  mesh.py         `MeshConfig` and the device mesh; sharding.py maps logical axis names
                  onto it.
  distributed.py  jax.distributed start-up (flags or a detected cluster).
  cli.py          what the scripts share: flags, one-line errors, exit codes.
"""
