"""Defaults for every config key; variants import this and override a few fields.

Every key is documented where it is declared. `lock_config=True` in the scripts makes an
unknown key (for example a typo on the command line) an error that names it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Shown in logs; the default workdir is runs/<name>.
  c.workdir = 'runs/base'  # Run folder: config, tokenizer, metrics, checkpoints, tb.
  c.seed = 0  # Seeds parameter init, dropout and data order.
  c.steps = 1000  # Optimizer steps to train for.
  c.batch_size = 8  # Global batch, in sequences (summed over all hosts and devices).
  c.seq_len = 128  # Tokens per sequence fed to the model.
  c.log_every = 10  # Steps between metric lines on stdout and in metrics.jsonl.
  c.eval_every = 0  # Steps between held-out evaluations; 0 = only at the end.
  c.eval_batches = 4  # Held-out batches per evaluation.
  c.checkpoint_every = 500  # Steps between checkpoints (one is always written at the end).
  c.keep_checkpoints = 2  # Recent checkpoints kept; at least 2, so a corrupt one has a fallback.
  # Fine-tune from: a run folder, RUN/checkpoints/<step>, or hf:PATH; empty = none.
  c.init_from = ''
  c.max_nonfinite_steps = 10  # Abort after this many NaN/inf (skipped) steps in a row; 0 = never.

  # Device mesh. The product must equal the number of devices; -1 takes what remains.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Pure data parallelism (parameters replicated).
  c.mesh.fsdp = 1  # Data parallelism with parameters and optimizer state sharded.
  c.mesh.tensor = 1  # Tensor (model) parallelism over heads, MLP width and vocab.
  # Logical axis name -> mesh axes. A dimension that a mesh axis does not divide is
  # replicated over that axis instead of failing.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('length', None),
      ('head_dim', None),
      ('layers', None),
  )

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 4096  # Must be >= the tokenizer's vocabulary.
  c.model.d_model = 256  # Residual stream width.
  c.model.num_layers = 4  # Transformer blocks.
  c.model.num_heads = 8  # Query heads.
  c.model.num_kv_heads = 4  # Key/value heads (grouped-query); must divide num_heads.
  c.model.head_dim = 0  # Per-head width; 0 = d_model // num_heads.
  c.model.d_ff = 768  # MLP hidden width.
  c.model.dtype = 'float32'  # Compute dtype (bfloat16 on accelerators).
  c.model.param_dtype = 'float32'  # Storage dtype of parameters and optimizer state.
  c.model.tie_embeddings = True  # Output head reuses the token embedding.
  c.model.dropout = 0.0  # Dropout on attention and MLP outputs.
  c.model.remat = False  # Recompute block activations in the backward pass.
  c.model.remat_policy = 'nothing_saveable'  # A jax.checkpoint_policies name.
  c.model.scan_layers = False  # One compiled block scanned over layers (fast compile).
  c.model.rope_theta = 10000.0  # RoPE base frequency.
  c.model.norm_eps = 1e-5  # RMSNorm epsilon.
  c.model.attention = 'auto'  # 'auto' (cuDNN on GPU in 16-bit, else XLA), 'xla', 'cudnn'.
  # Architecture switches (each changes what the parameters mean, so a resume keeps it):
  c.model.qk_norm = False  # RMSNorm on each head's queries and keys (own gain), before RoPE.
  c.model.mlp = 'swiglu'  # 'swiglu' (gate, up, down) or 'relu2': relu(x up)^2 down, no gate.
  c.model.zero_init_out = False  # Attention out and MLP down projections initialised to 0.
  c.model.logit_softcap = 0.0  # logits = cap * tanh(logits / cap) (Gemma 2 uses 30); 0 = off.
  # muP width transfer (lm/model/mup.py), m = d_model / this: hidden matrices' Adam rate (and
  # decay) / m, logits / m, attention logits / head_dim, so a rate tuned at this width
  # holds at others; d_ff and the heads' width are meant to grow with d_model. 0 = off.
  c.model.mup_base_width = 0

  # How the loss is computed (lm/model/loss.py); the z-loss weight is optimizer.z_loss.
  c.loss = ml_collections.ConfigDict()
  # Tokens per row in each chunk of the float32 loss (and its gradient), so the full
  # B x T x V logits never exist; 0 = whole rows. Must divide seq_len.
  c.loss.chunk = 0
  # The key's old name, linked: setting either sets both (lm/config.py MOVED_KEYS).
  c.model.loss_chunk = c.loss.get_ref('chunk')

  c.optimizer = ml_collections.ConfigDict()
  # 'adamw': AdamW on every parameter. 'muon': Muon (optax.contrib.muon: Nesterov momentum
  # 0.95, Newton-Schulz orthogonalisation) on the hidden weight matrices (attention
  # and MLP), AdamW at optimizer.lr on the rest (embeddings, output head, norm gains), both
  # on the schedule below.
  c.optimizer.name = 'adamw'
  c.optimizer.lr = 3e-3  # Peak learning rate (AdamW's; with 'muon', of the non-matrices).
  # 'muon': peak rate of the hidden matrices. Their schedule is lr's scaled by muon_lr / lr
  # (min_lr too), so optimizer.lr keeps one meaning whichever optimizer is chosen.
  c.optimizer.muon_lr = 0.02
  # 'muon': Newton-Schulz iterations per step (the reference's 5). Their cost does not
  # grow with the batch, so at small batches fewer buy speed (docs/recipes.md).
  c.optimizer.muon_ns_steps = 5
  # 'muon': how each matrix is scaled before the first iteration: 'frobenius' (the
  # reference), 'spectral', 'aol' or 'schatten' (the last two orthogonalise a test matrix
  # more per iteration; in training AOL measured level with Frobenius, docs/recipes.md).
  c.optimizer.muon_preconditioning = 'frobenius'
  c.optimizer.min_lr = 3e-4  # Final learning rate of the cosine / WSD decay.
  c.optimizer.warmup_steps = 50  # Linear warmup from 0.
  c.optimizer.schedule = 'cosine'  # 'cosine' | 'wsd' | 'constant'.
  c.optimizer.decay_fraction = 0.2  # WSD: fraction of steps spent decaying at the end.
  # Decoupled decay (times each part's own rate) of matrices and embeddings, not norms.
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0  # Global gradient-norm clip; 0 = off.
  c.optimizer.grad_accum = 1  # Micro-batches per step (the batch is split, not grown).
  c.optimizer.z_loss = 0.0  # Weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4).

  c.data = ml_collections.ConfigDict()
  c.data.source = 'stdlib'  # 'stdlib' | 'files' | 'hub'.
  c.data.files = ''  # 'files': comma-separated globs of .txt/.jsonl/.jsonl.gz/.parquet.
  c.data.name = ''  # 'hub': dataset name for datasets.load_dataset(streaming=True).
  c.data.config_name = ''  # 'hub': dataset config (subset), if any.
  c.data.split = 'train'  # 'hub': split to stream.
  c.data.text_key = 'text'  # Column holding the text (jsonl, parquet, hub).
  c.data.tokenizer = ''  # sentencepiece model path; empty = train one into the run folder.
  c.data.eval_fraction = 0.01  # Share of documents held out (stable hash of their key).
  c.data.mixture = ''  # Weighted sources 'KIND[:ARG]:WEIGHT;...' (data/mixture.py); '' = off.
  # Packing streams over all hosts; 0 = one per global row. Each document goes to the
  # stream dealt the fewest characters so far, which keeps them level (data/dealing.py).
  c.data.streams = 0
  c.data.min_chars = 0  # Drop documents shorter than this (blank ones are always dropped).
  c.data.dedup = False  # Drop exact duplicate documents within an epoch of each source.
  # Mark each packed document: attention stays inside it and positions restart at 0.
  c.data.segment_ids = False
  c.data.encode_threads = 0  # Threads for batched sentencepiece encoding; 0 = every core.
  # 'text': plain documents. 'sft': JSON lines of {"prompt", "response"}, {"messages"} or
  # task examples {"context", "choices", "label"}, packed whole, loss on responses only.
  c.data.format = 'text'

  # Optional Weights & Biases mirror of metrics.jsonl (pip install 'lm[wandb]').
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''  # '' = off.
  c.wandb.entity = ''  # Team or user; '' = the logged-in user's default.
  c.wandb.name = ''  # Display name; '' = the run folder's name.
  c.wandb.mode = ''  # 'online' | 'offline' | 'disabled'; '' = WANDB_MODE, else online.
  return c
