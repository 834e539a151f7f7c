"""Knowledge distillation (`distill.teacher`): the loss against a teacher's next-token
distributions, and the teacher's parameters on this run's mesh.

  loss = ce_weight * CE(student, targets) + kl_weight * T^2 * KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T), averaged over the same tokens as the usual loss (the
trained tokens of a fine-tuning batch). The T^2 keeps the gradient's scale as T grows
(Hinton et al., 2015). The teacher is any model of the same tokenizer: the unpruned run
a pruned one recovers from, or a larger one; its parameters are an argument of the
compiled step, never part of the state, so checkpoints hold the student alone. With the
teacher equal to the student the KL term is 0 and the loss is the usual one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from data.batch import Batch
from lm.config import Configs, DistillConfig
from lm.model.forward import forward
from lm.model.loss import cross_entropy
from lm.model.params import abstract_params
from lm.model.transformer import Transformer
from lm.run.folder import RunFolder
from lm.run.meta import file_sha256
from lm.sharding import AxisRules

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Teacher:
  model: Transformer
  params: Any
  workdir: str
  step: int


def check_teacher(cfgs: Configs, tokenizer_path: str | None) -> Any:
  """distill.teacher's checkpoint (a resume.Source), once it is known to share this run's
  vocabulary and, when `tokenizer_path` is known, its tokenizer; None without a teacher.
  Reads only, so a run can refuse before it writes anything."""
  from lm.train.resume import resolve_init_from  # resume imports the step, which imports this.

  d = cfgs.distill
  if not d.teacher:
    return None
  if cfgs.loss.chunk:
    raise ValueError('distill.teacher: distillation needs the whole logits; set loss.chunk=0 '
                     f'(got loss.chunk={cfgs.loss.chunk})')
  if cfgs.model.moe.enabled:
    raise ValueError('distill.teacher: distilling into a mixture of experts is not '
                     'supported yet')
  source = resolve_init_from(d.teacher, flag='distill.teacher')
  folder = RunFolder(source.workdir)
  vocab = folder.checkpoint_config(source.step).model.vocab_size
  if vocab != cfgs.model.vocab_size:
    raise ValueError(f'distill.teacher: {d.teacher} has a vocabulary of {vocab}, this run '
                     f'{cfgs.model.vocab_size}; a teacher must share the tokenizer')
  if tokenizer_path is not None and (
      not os.path.isfile(folder.tokenizer_path)
      or file_sha256(folder.tokenizer_path) != file_sha256(tokenizer_path)):
    raise ValueError(f'distill.teacher: {folder.tokenizer_path} is not this run\'s tokenizer '
                     f'({tokenizer_path}); a teacher must share the tokenizer')
  return source


def load_teacher(cfgs: Configs, rules: AxisRules, tokenizer_path: str) -> Teacher | None:
  """distill.teacher's parameters, sharded on `rules`' mesh; None without a teacher."""
  source = check_teacher(cfgs, tokenizer_path)
  if source is None:
    return None
  folder = RunFolder(source.workdir)
  teacher_cfg = folder.checkpoint_config(source.step).model
  model = Transformer(dataclasses.replace(teacher_cfg, dropout=0.0, remat=False), rules)
  params = folder.restore_params(source.step, abstract_params(model, rules))
  return Teacher(model, params, source.workdir, source.step)


def distill_loss(model: Transformer, params: Any, teacher: Transformer, teacher_params: Any,
                 batch: Batch, cfg: DistillConfig, *, z_loss: float = 0.0,
                 rngs: dict[str, jax.Array] | None = None,
                 weights_BxT: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """The weighted sum above, and metrics: loss (the usual CE), z_loss, distill_kl."""
  logits_BxTxV, targets_BxT = forward(model, params, batch, train=True, rngs=rngs)
  teacher_BxTxV, _ = forward(teacher, teacher_params, batch)
  ce, metrics = cross_entropy(logits_BxTxV, targets_BxT, z_loss, weights_BxT)
  kl_BxT = kl_per_token(jax.lax.stop_gradient(teacher_BxTxV), logits_BxTxV, cfg.temperature)
  kl = jnp.mean(kl_BxT) if weights_BxT is None else jnp.sum(kl_BxT * weights_BxT)
  total = cfg.ce_weight * ce + cfg.kl_weight * cfg.temperature ** 2 * kl
  return total, {**metrics, 'distill_kl': kl}


def kl_per_token(teacher_BxTxV: jax.Array, student_BxTxV: jax.Array,
                 temperature: float) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) per token, in float32."""
  t = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
