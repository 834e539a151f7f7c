"""The optimizer's config: `OptimizerConfig`, the `optimizer.*` keys, validated whenever
one is made. lm/optim/optimizer.py builds the optax transformation from it.
"""

from __future__ import annotations

import dataclasses

OPTIMIZERS = ('adamw', 'muon')
# How Muon scales a matrix before its first Newton-Schulz iteration (optax's names):
# Frobenius norm (the reference), spectral norm, AOL's per-row rescaling, or the
# Schatten-4 norm; the last two bring small singular values nearer 1 in fewer iterations.
MUON_PRECONDITIONINGS = ('frobenius', 'spectral', 'aol', 'schatten')
SCHEDULES = ('cosine', 'wsd', 'constant')

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The `optimizer.*` keys: the update rule, its learning-rate schedule, the clip."""

  name: str = 'adamw'
  """'adamw': AdamW on every parameter. 'muon': Muon (optax.contrib.muon: Nesterov momentum
  0.95, Newton-Schulz orthogonalisation) on the hidden weight matrices (attention and
  MLP) and AdamW at lr on the rest (embeddings, output head, norm gains), both on the
  schedule below."""
  lr: float = 3e-3
  """Peak learning rate (AdamW's; with 'muon', that of the non-matrices)."""
  muon_lr: float = 0.02
  """'muon': peak rate of the hidden matrices. Their schedule is lr's scaled by
  muon_lr / lr (min_lr too), so lr keeps one meaning whichever optimizer is chosen."""
  muon_ns_steps: int = 5
  """'muon': Newton-Schulz iterations per step (the reference's 5). Their cost does not
  grow with the batch, so at small batches fewer buy speed (docs/recipes.md)."""
  muon_preconditioning: str = 'frobenius'
  """'muon': how each matrix is scaled before the first iteration: 'frobenius' (the
  reference), 'spectral', 'aol' or 'schatten' (see MUON_PRECONDITIONINGS)."""
  min_lr: float = 3e-4
  """Final learning rate of the cosine or WSD decay."""
  warmup_steps: int = 50
  """Linear warmup from 0."""
  schedule: str = 'cosine'
  """'cosine' | 'wsd' (warmup, stable, decay) | 'constant'."""
  decay_fraction: float = 0.2
  """'wsd': the fraction of the steps spent decaying, at the end."""
  weight_decay: float = 0.1
  """Decoupled decay (times each part's own rate) of matrices and embeddings, not norms."""
  b1: float = 0.9
  """Adam's first-moment decay."""
  b2: float = 0.95
  """Adam's second-moment decay."""
  eps: float = 1e-8
  """Adam's epsilon."""
  clip_norm: float = 1.0
  """Global gradient-norm clip; 0 = off."""
  grad_accum: int = 1
  """Micro-batches per step (the batch is split, not grown); must divide batch_size."""
  z_loss: float = 0.0
  """Weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)."""
  hold_zeros: bool = False
  """Weights that are exactly zero when training starts never move (their updates are
  zeroed after the optimizer, weight decay included): recovering a pruned run
  (scripts/prune.py) with `init_from` keeps its sparsity. Needs init_from."""

  def __post_init__(self) -> None:
    self.validate()  # Wherever an OptimizerConfig is made: parse, replace(), tests.

  def validate(self) -> None:
    """Raises ValueError('optimizer.KEY: why (got VALUE)') for the first bad key."""
    def bad(key, why):
      raise ValueError(f'optimizer.{key}: {why} (got {getattr(self, key)!r})')

    if self.name not in OPTIMIZERS:
      bad('name', f'expected one of {", ".join(OPTIMIZERS)}')
    for key in ('lr', 'muon_lr'):  # A zero or negative rate trains nothing, or ascends.
      if not getattr(self, key) > 0:
        bad(key, 'must be positive')
    for key in ('min_lr', 'weight_decay', 'clip_norm', 'eps', 'z_loss', 'warmup_steps'):
      if getattr(self, key) < 0:
        bad(key, 'must be >= 0')
    for key in ('b1', 'b2'):
      if not 0.0 <= getattr(self, key) < 1.0:
        bad(key, 'must be in [0, 1)')
    if self.schedule not in SCHEDULES:
      bad('schedule', f'expected one of {", ".join(SCHEDULES)}')
    if self.muon_ns_steps < 1:
      bad('muon_ns_steps', 'must be >= 1')
    if self.muon_preconditioning not in MUON_PRECONDITIONINGS:
      bad('muon_preconditioning', f'expected one of {", ".join(MUON_PRECONDITIONINGS)}')
    if self.grad_accum < 1:
      bad('grad_accum', 'must be >= 1')
    if not 0.0 <= self.decay_fraction <= 1.0:
      bad('decay_fraction', 'must be in [0, 1]')
