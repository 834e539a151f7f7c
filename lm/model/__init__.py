"""The model: pure functions of a config and parameters.

  config.py       ModelConfig (`model.*`) and LossConfig (`loss.*`).
  transformer.py  the Flax Linen decoder: RMSNorm, RoPE, GQA attention, SwiGLU / ReLU^2,
                  soft-cap, the KV cache for decoding, logical axis names.
  params.py       the parameter tree from shapes alone (boxed with logical axes, their
                  names, restore targets) and the scanned <-> per-layer layouts.
  positions.py    RoPE (with Llama 3's frequency scaling) and positions inside documents.
  context.py      attention over rows split on the mesh's context axis: ring, all-gather.
  moe.py          mixture of experts: router, balance losses, router bias, load stats.
  experts.py      tokens through their experts: ragged_dot or capacity buffers, the
                  all-to-all exchange over the mesh's expert axis.
  mup.py          muP width transfer: rate and init multipliers.
  loss.py         next-token cross-entropy in float32, whole or chunked.
  forward.py      the batch -> (output, targets) pass and the loss, shared by training
                  and evaluation.
  flops.py        parameter counts, FLOPs per token, device peaks and MFU.
"""
