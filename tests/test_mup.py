"""muP width transfer (`model.mup_base_width`, lm/model/mup.py): the coordinate check, the
multipliers by hand, off leaving everything as it was, export and resume refusing it, and
training alike on a mesh."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from data.batch import Batch
from lm.config import parse
from lm.export import gguf_export, hf
from lm.mesh import MeshConfig
from lm.model import mup
from lm.model.config import ModelConfig
from lm.model.forward import model_loss
from lm.model.params import param_axes
from lm.model.transformer import Transformer, output_head
from lm.optim.config import OptimizerConfig
from lm.optim.optimizer import make_optimizer
from lm.run import meta
from lm.sharding import AxisRules
from lm.train import resume
from lm.train.step import init_state, jit_train_step, step_parts
from tests.helpers import cached_decode

SMALL = ModelConfig(vocab_size=128, d_model=256, num_layers=2, num_heads=8, num_kv_heads=4,
                    d_ff=512, tie_embeddings=False)
MUP = dataclasses.replace(SMALL, mup_base_width=64)  # m = 4
CONSTANT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule='constant', weight_decay=0.0,
                           clip_norm=0.0)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg):
  model = Transformer(cfg)
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))['params']


def _tokens(shape, vocab=128, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


# The coordinate check (Yang et al., Tensor Programs V, figure 5)

WIDTHS = (64, 128, 256, 512)


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _coord_cfg(width, base_width):
  # head_dim fixed at 16, so heads (and kv heads) grow with width; tied, the default.
  return ModelConfig(vocab_size=128, d_model=width, num_layers=2, num_heads=width // 16,
                     num_kv_heads=width // 32, d_ff=2 * width, mup_base_width=base_width)


@functools.cache
def _coord_init(width):
  # Tied, the init is the same with muP on or off (only an untied head differs): one compile serves
  # both. An 'rbg' key compiles faster than threefry; the draws are alike in law.
  init = jax.jit(lambda key, tokens: Transformer(_coord_cfg(width, 0)).init(key, tokens))
  return nn.meta.unbox(init(jax.random.key(0, impl='rbg'), jnp.zeros((1, 8), jnp.int32)))


def _coord(width, base_width, steps=4, lr=1e-2):
  """RMS of how far the residual stream after each block, and the logits, moved from
  their values at init after `steps` Adam steps on one batch: one figure per layer."""
  cfg = _coord_cfg(width, base_width)
  model = Transformer(cfg)
  axes = param_axes(model)
  tx = make_optimizer(dataclasses.replace(CONSTANT, lr=lr), steps, axes,
                      mup.lr_scales(cfg, axes))
  tokens = _tokens((4, 33))

  def acts(params):
    logits, state = model.apply({'params': params}, tokens[:, :-1], capture_intermediates=True)
    blocks = [state['intermediates'][f'block_{i}']['__call__'][0][0] for i in range(2)]
    return blocks + [logits]

  def step(_, carry):
    params, opt_state = carry
    grads = jax.grad(lambda p: model_loss(model, p, Batch(tokens))[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def run(params):
    before = acts(params)
    params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
    return jnp.stack([_rms(b - a) for a, b in zip(before, acts(params))])

  return np.asarray(run(_coord_init(width)['params']))


@pytest.mark.slow
def test_coordinate_check_is_flat_in_width_with_mup_and_grows_without():
  on = np.stack([_coord(w, 64) for w in WIDTHS])  # widths x (block_0, block_1, logits)
  off = np.stack([_coord(w, 0) for w in (WIDTHS[0], WIDTHS[-1])])
  # muP: every layer's change stays within a factor 2 of width 64's at every width.
  ratio_on = on / on[0]
  assert (ratio_on > 0.5).all() and (ratio_on < 2.0).all(), on
  # Standard parametrisation: Adam's per-entry updates add up over the width, so the
  # residual stream and the logits move several times further at width 512 than at 64.
  # Measured, width 512 over 64: muP 0.93, 1.02, 0.62 (the logits' init part fades as
  # 1/sqrt(m)); off 44, 32, 4.1. Without muP's rates, or its logit multiplier, the muP
  # side fails (29x in the residual stream; 3.9x in the logits).
  ratio_off = off[-1] / off[0]
  assert (ratio_off[:2] > 5).all() and ratio_off[2] > 3, off


# The multipliers by hand


def test_multipliers_for_a_width_four_times_the_base():
  assert (mup.width_mult(MUP), mup.output_mult(MUP), mup.head_init_scale(MUP)) == (4, 0.25, 4)
  # sqrt(head size at the base width, 64 / 8) / head size (256 / 8): 1/sqrt(32) / sqrt(m).
  assert mup.attention_scale(MUP) == pytest.approx(np.sqrt(8) / 32)
  scales = mup.lr_scales(MUP, param_axes(Transformer(MUP)))
  for name in ('q', 'k', 'v', 'o'):
    assert scales['block_0']['attn'][name] == 0.25
  for name in ('gate', 'up', 'down'):
    assert scales['block_1']['mlp'][name] == 0.25
  assert scales['embed'] == scales['head'] == scales['final_norm']['scale'] == 1.0
  assert scales['block_0']['attn_norm']['scale'] == scales['block_0']['mlp_norm']['scale'] == 1.0
  stacked = dataclasses.replace(MUP, scan_layers=True)
  scales = mup.lr_scales(stacked, param_axes(Transformer(stacked)))
  assert scales['blocks']['attn']['q'] == 0.25 and scales['blocks']['attn_norm']['scale'] == 1


def test_init_only_the_untied_head_changes_to_the_base_widths_std():
  off, on = _init(SMALL), _init(MUP)
  for path, x in jax.tree_util.tree_leaves_with_path(on):
    if jax.tree_util.keystr(path) != "['head']":
      np.testing.assert_array_equal(x, _pick(off, path))  # hidden: fan-in init already
  np.testing.assert_allclose(on['head'], 2.0 * off['head'], rtol=1e-6)  # sqrt(m)
  assert abs(float(jnp.std(on['head'])) * np.sqrt(64) - 1) < 0.05
  assert abs(float(jnp.std(on['block_0']['attn']['q'])) * np.sqrt(256) - 1) < 0.05


def _pick(tree, path):
  return functools.reduce(lambda t, k: t[k.key], path, tree)


@pytest.mark.parametrize('tied', [False, True])
def test_logits_are_the_standard_ones_with_q_and_logits_rescaled(tied):
  """muP's forward = the standard model with q times 1/sqrt(m) (attention logits by
  head_dim, not its root, equal to the standard model's at the base width) and the
  logits times 1/m."""
  cfg = dataclasses.replace(MUP, tie_embeddings=tied)
  params, tokens = _init(cfg), _tokens((2, 16))
  folded = jax.tree.map(lambda x: x, params)
  for i in range(cfg.num_layers):
    folded[f'block_{i}']['attn']['q'] = params[f'block_{i}']['attn']['q'] / 2  # sqrt(m)
  standard = Transformer(dataclasses.replace(cfg, mup_base_width=0))
  x_BxTxD = standard.apply({'params': folded}, tokens, features=True)
  want = x_BxTxD @ output_head(params, standard.cfg) / 4
  got = Transformer(cfg).apply({'params': params}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Control: the plain standard model is another function.
  plain = standard.apply({'params': params}, tokens)
  assert np.abs(np.asarray(got - plain)).max() > 1e-2


def test_cached_decoding_equals_the_full_forward():
  """The decode path divides attention logits by head_dim too."""
  params = _init(MUP)
  prompts = [[2, 11, 12, 13, 14, 15], [2, 21]]
  more = np.array([[40, 41, 42], [43, 44, 45]], np.int32)
  prefill, decoded, p = cached_decode(Transformer(MUP), params, prompts, more)
  for r, prompt in enumerate(prompts):
    full = np.asarray(Transformer(MUP).apply(
        {'params': params}, jnp.asarray([prompt + more[r].tolist()])))[0]
    n = len(prompt)
    np.testing.assert_allclose(prefill[r, p - n:], full[:n], rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(decoded):
      np.testing.assert_allclose(logits[r], full[n + i], rtol=1e-5, atol=1e-5)


def test_chunked_loss_sees_the_logit_multiplier():
  params, tokens = _init(MUP), _tokens((2, 17))
  plain = model_loss(Transformer(MUP), params, Batch(tokens))[0]
  chunked = model_loss(Transformer(MUP), params, Batch(tokens), chunk=8)[0]
  np.testing.assert_allclose(chunked, plain, rtol=1e-6)


def test_adam_rates_and_decay_scale_by_one_over_m_on_hidden_matrices_only():
  params = _init(MUP)
  axes = param_axes(Transformer(MUP))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  opt = dataclasses.replace(CONSTANT, weight_decay=0.1)

  def first(scales):
    tx = make_optimizer(opt, 10, axes, scales)
    return tx.update(grads, tx.init(params), params)[0]

  plain, scaled = first(None), first(mup.lr_scales(MUP, axes))
  for path, x in jax.tree_util.tree_leaves_with_path(scaled):
    factor = 0.25 if path[-1].key in ('q', 'k', 'v', 'o', 'gate', 'up', 'down') else 1.0
    np.testing.assert_allclose(x, factor * _pick(plain, path), rtol=1e-6)


def test_under_muon_the_rate_multipliers_change_nothing():
  """The hidden matrices are Muon's, already scaled for their shape; AdamW's part has
  none of them, so its multipliers are all 1."""
  params = _init(MUP)
  axes = param_axes(Transformer(MUP))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  muon = dataclasses.replace(CONSTANT, name='muon')

  def first(scales):
    tx = make_optimizer(muon, 10, axes, scales)
    return tx.update(grads, tx.init(params), params)[0]

  for x, y in zip(jax.tree.leaves(first(mup.lr_scales(MUP, axes))), jax.tree.leaves(first(None))):
    np.testing.assert_array_equal(x, y)


# Off: nothing changes


def test_off_by_default_and_the_same_model_and_optimizer_as_before():
  assert ModelConfig().mup_base_width == 0 and base.get_config().model.mup_base_width == 0
  assert mup.lr_scales(SMALL, param_axes(Transformer(SMALL))) is None
  assert mup.attention_scale(SMALL) is None and mup.output_mult(SMALL) == 1.0
  # The only optimizer-state addition when on is an empty state: no new arrays.
  params = _init(MUP)
  axes = param_axes(Transformer(MUP))
  on = make_optimizer(CONSTANT, 10, axes, mup.lr_scales(MUP, axes)).init(params)
  off = make_optimizer(CONSTANT, 10, axes).init(params)
  assert len(jax.tree.leaves(on)) == len(jax.tree.leaves(off))


def test_base_width_equal_to_d_model_is_the_standard_model():
  """So a rate tuned at the base width without muP is the rate muP transfers."""
  same = dataclasses.replace(SMALL, mup_base_width=SMALL.d_model)
  params = _init(same)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(_init(SMALL))):
    np.testing.assert_array_equal(x, y)
  scales = mup.lr_scales(same, param_axes(Transformer(same)))
  assert set(jax.tree.leaves(scales)) == {1.0} and mup.output_mult(same) == 1.0
  tokens = _tokens((2, 16))
  np.testing.assert_allclose(Transformer(same).apply({'params': params}, tokens),
                             Transformer(SMALL).apply({'params': params}, tokens),
                             rtol=1e-5, atol=1e-6)


def test_negative_base_width_names_the_key():
  with pytest.raises(ValueError, match='model.mup_base_width'):
    ModelConfig(mup_base_width=-1)


# Export and resume


def test_hugging_face_and_gguf_exports_refuse_it_by_key():
  for check in (hf.check_expressible, gguf_export.check_expressible):
    check(SMALL)
    with pytest.raises(ValueError, match='model.mup_base_width=64'):
      check(MUP)


def test_a_resume_that_changes_the_base_width_is_refused_by_key():
  before = resume.fingerprint(SMALL, None)
  other = dataclasses.replace(MUP, mup_base_width=128)
  for saved, now in ((SMALL, MUP), (MUP, SMALL), (MUP, other)):
    diffs = meta.incompatibilities(resume.fingerprint(saved, None),
                                         resume.fingerprint(now, None))
    assert len(diffs) == 1 and diffs[0].startswith('model.mup_base_width: ')
  # A checkpoint from before the key existed was trained without muP.
  older = {'model': {k: v for k, v in before['model'].items() if k != 'mup_base_width'}}
  assert not meta.incompatibilities(resume.with_default_model_keys(older), before)
  diffs = meta.incompatibilities(resume.with_default_model_keys(older),
                                       resume.fingerprint(MUP, None))
  assert len(diffs) == 1 and diffs[0].startswith('model.mup_base_width: ')
  assert 'mup_base_width' not in meta.RUNTIME_MODEL_KEYS


# Meshes


def _train(shape, name='adamw', steps=3):
  """Losses of `steps` steps of the config's own train step (lm.train.step.step_parts)."""
  config = base.get_config()
  config.model.update(vocab_size=256, d_model=128, num_layers=2, num_heads=8, num_kv_heads=4,
                      d_ff=256, scan_layers=True, mup_base_width=32)
  config.optimizer.update(name=name, lr=1e-2, warmup_steps=0, schedule='constant')
  config.update(steps=steps, batch_size=8, seq_len=32)
  cfgs = parse(config)
  devices = jax.devices()[:int(np.prod(shape))]
  rules = AxisRules.from_config(MeshConfig(*shape, rules=cfgs.mesh.rules), devices)
  parts = step_parts(cfgs, rules)
  state, shardings = init_state(parts.model, parts.tx, 32, rules, seed=0)
  step = jit_train_step(parts.step_fn, shardings, rules, (8, 33))
  data = np.random.default_rng(0).integers(0, 256, (steps, 8, 33)).astype(np.int32)
  losses = []
  for tokens in data:
    state, metrics = step(state, Batch(tokens))
    losses.append(float(metrics['loss']))
  return losses


@pytest.mark.slow
def test_trains_alike_on_an_fsdp_mesh():
  reference = _train((1, 1, 1))
  np.testing.assert_allclose(_train((1, 8, 1)), reference, rtol=1e-5)
  assert reference[0] != reference[-1]
