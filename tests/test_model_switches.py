"""The architecture switches: QK-norm, ReLU-squared MLP, zero-initialised output
projections and logit soft-capping. Each is off by default and leaves the model as it
was; each is checked on, with a control that shows the check has teeth."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.batch import Batch
from lm.model import flops
from lm.model.config import ModelConfig
from lm.model.forward import model_loss
from lm.model.params import stack_layers
from lm.model.transformer import MLP, Transformer
from lm.optim.optimizer import muon_dimensions
from lm.run import meta
from lm.train import resume
from tests.helpers import cached_decode

SMALL = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=96, tie_embeddings=False)
SWITCHES = {'qk_norm': {'qk_norm': True}, 'relu2': {'mlp': 'relu2'},
            'zero_init_out': {'zero_init_out': True}, 'softcap': {'logit_softcap': 2.0}}


def _cfg(name, **more):
  return dataclasses.replace(SMALL, **SWITCHES[name], **more)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(cfg, seed=0):
  params = Transformer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 16), jnp.int32))
  return nn.meta.unbox(params)['params']


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens):
  return Transformer(cfg).apply({'params': params}, tokens)


def _tokens(shape, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, SMALL.vocab_size)


def _paths(tree):
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_defaults_are_off_and_keep_the_parameter_tree():
  assert (SMALL.qk_norm, SMALL.mlp, SMALL.zero_init_out, SMALL.logit_softcap) == (
      False, 'swiglu', False, 0.0)
  block = {"['attn']['q']": (64, 4, 16), "['attn']['k']": (64, 2, 16),
           "['attn']['v']": (64, 2, 16), "['attn']['o']": (4, 16, 64),
           "['attn_norm']['scale']": (64,), "['mlp']['gate']": (64, 96),
           "['mlp']['up']": (64, 96), "['mlp']['down']": (96, 64),
           "['mlp_norm']['scale']": (64,)}
  want = {"['embed']": (128, 64), "['head']": (64, 128), "['final_norm']['scale']": (64,)}
  for i in range(2):
    want.update({f"['block_{i}']" + k: v for k, v in block.items()})
  assert _paths(_init(SMALL)) == want


@pytest.mark.parametrize('name', SWITCHES)
def test_a_switch_leaves_the_other_parameters_bit_for_bit(name):
  # A module's initialisers draw in the order its parameters are created, so only the
  # module a switch changes may move: the zeroed projections, the gateless MLP.
  off, on = _paths(_init(SMALL)), _init(_cfg(name))
  base = dict(jax.tree_util.tree_leaves_with_path(_init(SMALL)))
  moved = {'zero_init_out': ('o', 'down'), 'relu2': ('up', 'down')}.get(name, ())
  for path, x in jax.tree_util.tree_leaves_with_path(on):
    if path in base and path[-1].key not in moved:
      np.testing.assert_array_equal(x, base[path])
  assert flops.count_params(on) == flops.num_params(_cfg(name))
  assert set(off) != set(_paths(on)) or name in ('zero_init_out', 'softcap')


@pytest.mark.parametrize('name', SWITCHES)
def test_causal_with_each_switch(name):
  cfg = _cfg(name)
  params = _init(cfg)
  if name == 'zero_init_out':  # At init the blocks are silent; train-like weights instead.
    params = jax.tree.map(lambda x, y: x + y, params, jax.tree.map(
        lambda x: 0.02 * jax.random.normal(jax.random.PRNGKey(3), x.shape), params))
  tokens = _tokens((2, 16))
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 128)
  a, b = _apply(cfg, params, tokens), _apply(cfg, params, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-4


# QK-norm


def test_qk_norm_parameters_and_axes():
  boxed = Transformer(_cfg('qk_norm')).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  specs = nn.get_partition_spec(boxed)['params']['block_0']['attn']
  assert tuple(specs['q_norm']['scale']) == ('head_dim',)
  assert tuple(specs['k_norm']['scale']) == ('head_dim',)
  params = nn.meta.unbox(boxed)['params']['block_0']['attn']
  np.testing.assert_array_equal(params['q_norm']['scale'], np.ones(16))
  # Gains, not matrices: with optimizer.name=muon they are AdamW's, stacked or not.
  assert muon_dimensions(('head_dim',)) is None
  assert muon_dimensions(('layers', 'head_dim')) is None


def _scaled(params, path, factor):
  block, module, name = path
  out = jax.tree.map(lambda x: x, params)
  out[block][module] = dict(out[block][module])
  if isinstance(out[block][module][name], dict):
    out[block][module][name] = {'scale': out[block][module][name]['scale'] * factor}
  else:
    out[block][module][name] = out[block][module][name] * factor
  return out


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
  cfg, tokens = _cfg('qk_norm'), _tokens((2, 16))
  params = _init(cfg)
  ref = _apply(cfg, params, tokens)
  for name in ('q', 'k'):
    got = _apply(cfg, _scaled(params, ('block_0', 'attn', name), 10.0), tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # The norms' own gains do act on the logits...
  for name in ('q_norm', 'k_norm'):
    got = _apply(cfg, _scaled(params, ('block_0', 'attn', name), 3.0), tokens)
    assert np.abs(np.asarray(got - ref)).max() > 1e-3
  # ...and without QK-norm the query scale does too (the control).
  plain = _init(SMALL)
  got = _apply(SMALL, _scaled(plain, ('block_0', 'attn', 'q'), 10.0), tokens)
  assert np.abs(np.asarray(got - _apply(SMALL, plain, tokens))).max() > 1e-3


@pytest.mark.parametrize('scan', [False, True])
def test_qk_norm_cached_decoding_equals_the_full_forward(scan):
  cfg = _cfg('qk_norm')
  params = _init(cfg)
  # Gains off one so a decode path that skipped the norms would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 1.7 if 'q_norm' in jax.tree_util.keystr(p) else x, params)
  model_cfg = dataclasses.replace(cfg, scan_layers=scan)
  if scan:
    params_run = stack_layers(params, cfg.num_layers)
  else:
    params_run = params
  prompts = [[2, 11, 12, 13, 14, 15], [2, 21]]
  more = np.array([[40, 41, 42], [43, 44, 45]], np.int32)
  prefill, decoded, p = cached_decode(Transformer(model_cfg), params_run, prompts, more)
  for r, prompt in enumerate(prompts):
    full = np.asarray(_apply(cfg, params, jnp.asarray([prompt + more[r].tolist()])))[0]
    n = len(prompt)
    np.testing.assert_allclose(prefill[r, p - n:], full[:n], rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(decoded):
      np.testing.assert_allclose(logits[r], full[n + i], rtol=1e-5, atol=1e-5)


# ReLU-squared MLP


def test_relu2_mlp_on_hand_derivable_weights():
  cfg = ModelConfig(vocab_size=8, d_model=2, num_layers=1, num_heads=1, num_kv_heads=1,
                    d_ff=3, mlp='relu2')
  up = jnp.array([[1.0, -2.0, 0.5], [1.0, 0.0, 1.0]])
  down = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
  x = jnp.array([[[1.0, 2.0]]])
  # x up = [3, -2, 2.5]; relu^2 = [9, 0, 6.25]; times down = [9 + 12.5, 6.25].
  out = MLP(cfg, None, True).apply({'params': {'up': up, 'down': down}}, x)
  np.testing.assert_allclose(out, [[[21.5, 6.25]]])
  shapes = jax.eval_shape(MLP(cfg, None, True).init, jax.random.PRNGKey(0), x)['params']
  assert set(shapes) == {'up', 'down'}  # Two matrices, no gate.
  # SwiGLU on the same weights (gate = up) differs: the switch really changes the MLP.
  swiglu = MLP(dataclasses.replace(cfg, mlp='swiglu'), None, True)
  other = swiglu.apply({'params': {'gate': up, 'up': up, 'down': down}}, x)
  assert np.abs(np.asarray(other - out)).max() > 1.0


# Zero-initialised output projections


@pytest.mark.slow
def test_zero_init_out_starts_each_block_as_the_identity():
  cfg = _cfg('zero_init_out')
  params = _init(cfg)
  for i in range(cfg.num_layers):
    assert not np.any(np.asarray(params[f'block_{i}']['attn']['o']))
    assert not np.any(np.asarray(params[f'block_{i}']['mlp']['down']))
    assert np.any(np.asarray(params[f'block_{i}']['attn']['q']))
  tokens = _tokens((2, 16))
  # The residual path alone: embedding -> final RMSNorm -> head.
  x = np.asarray(params['embed'])[np.asarray(tokens)]
  x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
  want = (x * np.asarray(params['final_norm']['scale'])) @ np.asarray(params['head'])
  np.testing.assert_allclose(_apply(cfg, params, tokens), want, rtol=1e-5, atol=1e-5)
  # The control: by default the blocks do act at init.
  plain = _init(SMALL)
  assert np.any(np.asarray(plain['block_0']['attn']['o']))
  # And the zero matrices still learn: their gradient is not zero.
  grads = jax.grad(lambda p: model_loss(Transformer(cfg), p, Batch(_tokens((2, 17))))[0])(params)
  assert np.abs(np.asarray(grads['block_1']['mlp']['down'])).max() > 0
  assert np.abs(np.asarray(grads['block_0']['attn']['o'])).max() > 0


# Logit soft-cap


def test_softcap_bounds_the_logits_and_is_tanh_of_the_uncapped():
  cfg = _cfg('softcap')
  params = _init(SMALL)  # The cap adds no parameters.
  params = {**params, 'head': params['head'] * 20.0}  # Logits well past the cap.
  tokens = _tokens((2, 16))
  raw, capped = _apply(SMALL, params, tokens), _apply(cfg, params, tokens)
  assert np.abs(np.asarray(raw)).max() > 4.0  # The control: uncapped they exceed it.
  assert np.abs(np.asarray(capped)).max() <= 2.0
  np.testing.assert_allclose(capped, 2.0 * np.tanh(np.asarray(raw) / 2.0), rtol=1e-5,
                             atol=1e-6)


def test_softcap_chunked_loss_and_gradient_equal_the_plain_ones():
  cfg = _cfg('softcap')
  model = Transformer(cfg)
  params = _init(cfg)
  params = {**params, 'head': params['head'] * 20.0}
  batch = Batch(_tokens((2, 17)))
  plain = jax.jit(jax.value_and_grad(lambda p: model_loss(model, p, batch)[0]))
  chunked = jax.jit(jax.value_and_grad(lambda p: model_loss(model, p, batch, chunk=4)[0]))
  (la, ga), (lb, gb) = plain(params), chunked(params)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # The control: the cap changes the loss, so equality above is not by chance.
  uncapped = model_loss(Transformer(SMALL), params, batch)[0]
  assert abs(float(uncapped) - float(la)) > 1e-2


@pytest.mark.parametrize('key,value', [('mlp', 'gelu'), ('logit_softcap', -1.0)])
def test_bad_switch_names_the_key(key, value):
  with pytest.raises(ValueError, match=f'model.{key}'):
    dataclasses.replace(SMALL, **{key: value})


# Resume


@pytest.mark.parametrize('name', SWITCHES)
def test_a_resume_that_flips_a_switch_is_refused_by_key(name):
  key, value = next(iter(SWITCHES[name].items()))
  before = resume.fingerprint(SMALL, None)
  diffs = meta.incompatibilities(before, resume.fingerprint(_cfg(name), None))
  assert len(diffs) == 1 and diffs[0].startswith(f'model.{key}: ')
  # A checkpoint written before the key existed was trained with its default.
  older = {'model': {k: v for k, v in before['model'].items() if k != key}}
  assert not meta.incompatibilities(resume.with_default_model_keys(older), before)
  diffs = meta.incompatibilities(resume.with_default_model_keys(older),
                                       resume.fingerprint(_cfg(name), None))
  assert len(diffs) == 1 and diffs[0].startswith(f'model.{key}: ')
  assert key not in meta.RUNTIME_MODEL_KEYS
