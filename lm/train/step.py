"""The train state, the loss, sharded initialisation and the pure train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data.batch import Batch
from lm.config import Configs, DistillConfig
from lm.model import moe, mup
from lm.model.forward import model_loss, target_weights
from lm.model.loss import Metrics
from lm.model.params import param_axes
from lm.model.transformer import Transformer
from lm.optim.optimizer import frozen, global_norm, hold_zeros, make_optimizer, schedule
from lm.sharding import AxisRules, batch_sharding, tree_shardings
from lm.train.distill import distill_loss


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key; dropout keys are folded from it and the step


def _boxed_state_fn(model: Transformer, tx: optax.GradientTransformation, seq_len: int):
  """key -> TrainState whose params still carry Linen's logical-axis boxes."""

  def boxed(key):
    params = model.init({'params': key}, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.fold_in(key, 1))

  return boxed


def init_state(model: Transformer, tx: optax.GradientTransformation, seq_len: int,
               rules: AxisRules, seed: int) -> tuple[TrainState, Any]:
  """Initialises the state directly in its sharded layout.

  `jax.eval_shape` gives the abstract state with its logical axis names; the shardings
  derived from it become the jitted initialiser's out_shardings, so no device ever holds
  the whole model.
  """
  boxed = _boxed_state_fn(model, tx, seq_len)
  key = jax.random.PRNGKey(seed)
  shardings = tree_shardings(jax.eval_shape(boxed, key), rules)
  state = jax.jit(lambda k: nn.meta.unbox(boxed(k)), out_shardings=shardings)(key)
  return state, shardings


def abstract_state(model: Transformer, tx: optax.GradientTransformation, seq_len: int,
                   rules: AxisRules) -> Any:
  """ShapeDtypeStructs (with shardings) of the state: an Orbax restore target."""
  abstract = jax.eval_shape(_boxed_state_fn(model, tx, seq_len), jax.random.PRNGKey(0))
  shardings = tree_shardings(abstract, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)


def state_from_params(params: Any, tx: optax.GradientTransformation, seed: int,
                      shardings: Any) -> TrainState:
  """A fresh state around given parameters (fine-tuning): step 0, a new optimizer state.

  The RNG is the one `init_state` would derive from `seed`.
  """

  def fresh(p):
    key = jax.random.PRNGKey(seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.fold_in(key, 1))

  return jax.jit(fresh, out_shardings=shardings)(params)


def _keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite`, else `old`: a select on the device, no host sync."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _microbatches(batch: Any, n: int, rules: AxisRules) -> Any:
  # Row r goes to micro-batch r % n, so each device keeps its own rows: no reshuffle.
  def split(rows_BxT1):
    b, t1 = rows_BxT1.shape
    micro_AxMxT1 = rows_BxT1.reshape(b // n, n, t1).swapaxes(0, 1)
    return rules.constrain(micro_AxMxT1, (None, 'batch', 'length'))

  return jax.tree.map(split, batch)


def make_train_step(model: Transformer, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, *, grad_accum: int = 1,
                    z_loss: float = 0.0, loss_chunk: int = 0,
                    rules: AxisRules, teacher: Transformer | None = None,
                    distill: DistillConfig | None = None) -> Callable[..., Any]:
  """Returns the pure `(state, batch) -> (state, metrics)`; see `Batch` for the batch.
  With a `teacher`, `(state, batch, teacher_params)` and the distillation loss
  (lm/train/distill.py; metrics also distill_kl).

  metrics: loss, z_loss, grad_norm (0 on a skipped step), lr, and nonfinite (1 when the
  loss or the gradients were NaN/inf and the update was skipped, else 0). With MoE
  layers also moe_balance, moe_router_z and moe_load: (MoE layers, E) token copies per
  expert; with model.moe.bias_rate the router biases move by the batch's load.
  """
  bias_rate = model.cfg.moe.bias_rate if model.cfg.moe.enabled else 0.0

  def loss_fn(params, batch_and_weights, key, teacher_params):
    batch, weights_BxT = batch_and_weights
    if teacher is not None:
      return distill_loss(model, params, teacher, teacher_params, batch, distill,
                          z_loss=z_loss, rngs={'dropout': key}, weights_BxT=weights_BxT)
    return model_loss(model, params, batch, chunk=loss_chunk, z_loss=z_loss, train=True,
                      rngs={'dropout': key}, weights_BxT=weights_BxT)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch,
                 teacher_params: Any = None) -> tuple[TrainState, Metrics]:
    key = jax.random.fold_in(state.rng, state.step)
    # Weighed over the whole batch before it is split: the micro-batches' mean is then
    # the mean over every trained token of the batch, however they fall.
    weighed = (batch._replace(loss_mask=None), target_weights(batch, float(grad_accum)))
    if grad_accum == 1:
      (_, aux), grads = grad_fn(state.params, weighed, key, teacher_params)
    else:
      def accumulate(carry, xs):
        i, micro = xs
        (_, aux), g = grad_fn(state.params, micro, jax.random.fold_in(key, i), teacher_params)
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      micro = _microbatches(weighed, grad_accum, rules)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      aux_shape = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                                 key, teacher_params)[0][1]
      zero_aux = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shape)
      (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux),
                                     (jnp.arange(grad_accum), micro))
      grads, aux = jax.tree.map(lambda x: x / grad_accum, (grads, aux))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    sown = aux.pop(moe.STATS, None)
    if sown is not None:
      aux['moe_load'] = moe.layer_counts(sown)
      if bias_rate:  # Counts over the whole global batch: every device's tokens.
        params = moe.update_router_bias(params, sown, bias_rate)
    # One NaN or inf would poison the parameters and Adam's moments for good, so such a
    # step is skipped: both stay as they were, only the step (and the data) move on.
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(aux['loss']) & jnp.isfinite(grad_norm)
    params, opt_state = _keep_if_finite(finite, (params, opt_state),
                                        (state.params, state.opt_state))
    # Skipped steps report zeros, so sums over a log interval stay finite.
    metrics = {**jax.tree.map(lambda x: jnp.where(finite, x, 0.0), aux),
               'grad_norm': jnp.where(finite, grad_norm, 0.0), 'lr': lr_schedule(state.step),
               'nonfinite': (~finite).astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What a config's train step is made of (shared by the trainer and the benchmark)."""

  model: Transformer
  tx: optax.GradientTransformation
  lr: optax.Schedule
  step_fn: Callable[..., Any]  # The pure step, before jit.


def step_parts(cfgs: Configs, rules: AxisRules,
               teacher: Transformer | None = None) -> StepParts:
  """The model, optimizer, schedule and pure train step a config describes; with a
  distillation `teacher` (lm/train/distill.py) the step takes its parameters too."""
  _check_expert_rows(cfgs, rules)
  model = Transformer(cfgs.model, rules)
  steps, opt = cfgs.run.steps, cfgs.optimizer
  lr = schedule(opt, steps)
  axes = param_axes(model)
  tx = make_optimizer(opt, steps, axes, mup.lr_scales(cfgs.model, axes))
  if cfgs.model.moe.enabled and cfgs.model.moe.bias_rate:
    tx = optax.chain(tx, frozen(frozenset({moe.BIAS})))  # The step sets the biases.
  if opt.hold_zeros:
    tx = optax.chain(tx, hold_zeros())
  step_fn = make_train_step(model, tx, lr, grad_accum=opt.grad_accum, z_loss=opt.z_loss,
                            loss_chunk=cfgs.loss.chunk, rules=rules, teacher=teacher,
                            distill=cfgs.distill)
  return StepParts(model, tx, lr, step_fn)


def _check_expert_rows(cfgs: Configs, rules: AxisRules) -> None:
  """Expert parallelism routes each device's own rows: every (micro-)batch must split over
  the batch axes, the expert axis included, or the experts' exchange has nothing to
  exchange."""
  shape = rules.mesh.shape
  if not cfgs.model.moe.enabled or shape['expert'] == 1:
    return
  rows = cfgs.run.batch_size // cfgs.optimizer.grad_accum
  devices = shape['data'] * shape['fsdp'] * shape['expert']
  if rows % devices:
    raise ValueError(f'batch_size: each (micro-)batch of {rows} rows must split over '
                     f'mesh.data x fsdp x expert = {devices} devices with mesh.expert > 1 '
                     f'(got {cfgs.run.batch_size})')


def jit_train_step(step_fn: Callable[..., Any], state_shardings: Any, rules: AxisRules,
                   batch_shape: tuple[int, int],
                   teacher_shardings: Any = None) -> Callable[..., Any]:
  """Compiles once: explicit shardings, the old state's buffers donated to the new one.

  One sharding serves every field of the batch: they share a shape. `teacher_shardings`:
  the step takes a distillation teacher's parameters as a third argument.
  """
  extra = () if teacher_shardings is None else (teacher_shardings,)
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, batch_sharding(rules, batch_shape), *extra),
                 out_shardings=(state_shardings, rules.replicated()),
                 donate_argnums=(0,))
