"""Mixture of experts: the grouped computation against the plain definition, expert
parallelism against one device, the balancing methods, and bad settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from data.batch import Batch
from lm.config import parse
from lm.mesh import MeshConfig
from lm.model import flops, moe
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sharding import AxisRules
from lm.train.step import init_state, jit_train_step, step_parts

N, D, F, E = 24, 8, 6, 8


def _weights(seed=0, e=E):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  scale = 0.3
  return (scale * jax.random.normal(k[0], (e, D, F)), scale * jax.random.normal(k[1], (e, D, F)),
          scale * jax.random.normal(k[2], (e, F, D))), jax.random.normal(k[3], (N, D))


def _logits(kind):
  """Router logits: random; with exact ties; or with expert 3 never chosen."""
  logits = jax.random.normal(jax.random.PRNGKey(7), (N, E))
  if kind == 'ties':  # Every other token scores all experts alike, others pairs alike.
    logits = logits.at[::2].set(0.0).at[1::2, 1].set(logits[1::2, 0])
  if kind == 'unused':
    logits = logits.at[:, 3].set(-30.0)
  return logits


def _moe_out(fn, x, logits, ws, k, router='softmax'):
  r = moe.route(logits, k, router)
  return fn(x, r.experts_NxK, r.weights_NxK, ws)


@pytest.mark.parametrize('k', [1, 2, E])
@pytest.mark.parametrize('kind', ['random', 'ties', 'unused'])
@pytest.mark.parametrize('router', ['softmax', 'sigmoid'])
def test_grouped_experts_equal_the_dense_reference_with_gradients(k, kind, router):
  ws, x = _weights()
  logits = _logits(kind)
  if kind == 'unused' and k < E:
    assert moe.route(logits, k, router).counts_E[3] == 0  # really an idle expert
  outs = {}
  for name, fn in (('grouped', moe.experts_local), ('dense', moe.dense_reference)):
    loss = lambda x, logits, ws, fn=fn: jnp.sum(jnp.sin(_moe_out(fn, x, logits, ws, k, router)))
    y = _moe_out(fn, x, logits, ws, k, router)
    outs[name] = (y, jax.grad(loss, argnums=(0, 1, 2))(x, logits, ws))
  (y, g), (y_ref, g_ref) = outs['grouped'], outs['dense']
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert float(jnp.abs(g[1]).max()) > 0  # the router gets a gradient through the weights


def test_ties_go_to_the_lower_expert_and_weights_sum_to_one():
  r = moe.route(jnp.zeros((3, E)), 2, 'softmax')
  np.testing.assert_array_equal(r.experts_NxK, [[0, 1]] * 3)
  np.testing.assert_allclose(r.weights_NxK, 0.5)
  # With every expert chosen, the softmax router's weights are the softmax itself.
  logits = _logits('random')
  r = moe.route(logits, E, 'softmax')
  mixed = jnp.zeros((N, E)).at[jnp.arange(N)[:, None], r.experts_NxK].set(r.weights_NxK)
  np.testing.assert_allclose(mixed, jax.nn.softmax(logits), atol=1e-6)


def test_the_bias_changes_the_choice_but_not_the_weights():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  plain = moe.route(logits, 1, 'sigmoid')
  biased = moe.route(logits, 1, 'sigmoid', jnp.array([-1.0, 0.0, 0.0, 0.0]))
  assert int(plain.experts_NxK[0, 0]) == 0 and int(biased.experts_NxK[0, 0]) == 1
  # One expert per token: its normalised weight is 1 whatever the bias.
  np.testing.assert_allclose(biased.weights_NxK, 1.0)
  two = moe.route(logits, 2, 'sigmoid', jnp.array([-1.0, 0.0, 0.0, 5.0]))
  s = np.asarray(jax.nn.sigmoid(logits[0]))
  np.testing.assert_allclose(two.weights_NxK[0], s[[3, 1]] / (s[3] + s[1]), rtol=1e-6)


def test_balance_loss_is_one_when_even_and_e_when_collapsed():
  even = moe.route(jnp.zeros((E, E)).at[jnp.arange(E), jnp.arange(E)].set(50.0), 1, 'softmax')
  np.testing.assert_allclose(moe.balance_loss(even), 1.0, rtol=1e-4)
  collapsed = moe.route(jnp.zeros((E, E)).at[:, 0].set(50.0), 1, 'softmax')
  np.testing.assert_allclose(moe.balance_loss(collapsed), E, rtol=1e-4)
  z = moe.route(jnp.zeros((2, E)), 1, 'softmax')
  np.testing.assert_allclose(moe.router_z_loss(z), np.log(E) ** 2, rtol=1e-6)


def _rules(**mesh):
  return _mesh_rules(MeshConfig(**{'data': 1, **mesh}))


def _mesh_rules(cfg):
  n = cfg.data * cfg.fsdp * cfg.tensor * cfg.expert * cfg.context
  return AxisRules.from_config(cfg, jax.devices()[:n])


@pytest.mark.parametrize('mesh', [{'expert': 4, 'data': 2}, {'expert': 4, 'fsdp': 2},
                                  {'expert': 8}, {'data': 8}, {'expert': 2, 'data': 2,
                                                                'tensor': 2}])
def test_expert_parallel_experts_equal_one_device(mesh):
  ws, _ = _weights(1)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6, D))
  logits = _logits('ties')[:, :E].repeat(2, axis=0)  # 48 = 8 x 6 tokens
  r = moe.route(logits, 2, 'softmax')
  ex, mix = r.experts_NxK.reshape(8, 6, 2), r.weights_NxK.reshape(8, 6, 2)
  rules = _rules(**mesh)

  def loss(x, mix, ws, rules):
    return jnp.sum(jnp.sin(moe.run_experts(x, ex, mix, ws, rules)))

  got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, rules), argnums=(0, 1, 2)))(x, mix, ws)
  want = jax.value_and_grad(lambda *a: loss(*a, None), argnums=(0, 1, 2))(x, mix, ws)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5)


SMALL = {'vocab_size': 256, 'd_model': 32, 'num_layers': 2, 'num_heads': 4, 'num_kv_heads': 2,
         'd_ff': 64}
MOE = {'num_experts': 8, 'experts_per_token': 2, 'expert_d_ff': 32, 'num_shared_experts': 1,
       'aux_loss': 0.01, 'z_loss': 0.001, 'bias_rate': 0.01}


def _cfgs(mesh, model=None, lr=1e-2, **top):
  c = base.get_config()
  c.steps, c.batch_size, c.seq_len = 10, 8, 16
  c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.schedule = lr, 0, 'constant'
  for key, value in {**SMALL, **(model or {})}.items():
    c.model[key] = value
  for key, value in MOE.items():
    c.model.moe[key] = value
  for key, value in {'data': 1, **mesh}.items():
    c.mesh[key] = value
  for key, value in top.items():
    c[key] = value
  return parse(c)


def _train(mesh, steps=3, model=None, tokens=None):
  # lr 1e-3: Adam divides by the gradient's size, so at 1e-2 the rounding of an expert
  # with few tokens (another order of sums on another mesh) moves it by 1e-5.
  cfgs = _cfgs(mesh, model, lr=1e-3)
  rules = _mesh_rules(cfgs.mesh)
  parts = step_parts(cfgs, rules)
  state, shardings = init_state(parts.model, parts.tx, cfgs.run.seq_len, rules, seed=0)
  step = jit_train_step(parts.step_fn, shardings, rules, (8, 17))
  if tokens is None:
    tokens = np.random.default_rng(0).integers(0, 256, (steps, 8, 17)).astype(np.int32)
  metrics = []
  for t in tokens:
    state, m = step(state, Batch(t))
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params)


@pytest.fixture(scope='module')
def one_device():
  return _train({'data': 1}, model={})


@pytest.mark.parametrize('mesh', [{'expert': 4}, {'data': 2, 'expert': 4},
                                  {'fsdp': 2, 'expert': 4}])
def test_train_steps_with_expert_parallelism_equal_one_device(one_device, mesh):
  if 'data' not in mesh and 'fsdp' not in mesh:
    mesh = {**mesh, 'data': 2}  # the rest of the 8 devices
  metrics, params = _train(mesh)
  ref_metrics, ref_params = one_device
  np.testing.assert_allclose([m['loss'] for m in metrics], [m['loss'] for m in ref_metrics],
                             rtol=1e-5)
  assert metrics[0]['loss'] != metrics[-1]['loss']
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_array_equal(m['moe_load'], r['moe_load'])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_router_bias_takes_no_gradient_and_follows_the_load(one_device):
  metrics, params = one_device
  bias = params['block_0']['mlp'][moe.BIAS]
  np.testing.assert_allclose(np.mean(bias), 0.0, atol=1e-6)  # re-centred every step
  # Three steps of +-0.01 each: where the load was always above the mean, the bias fell
  # every step.
  loads = np.stack([m['moe_load'][0] for m in metrics])
  always_busy = np.all(loads > loads.mean(axis=1, keepdims=True), axis=0)
  signs = -np.sign(loads - loads.mean(axis=1, keepdims=True)).sum(0)
  expected = 0.01 * signs
  np.testing.assert_allclose(bias, expected - expected.mean(), atol=1e-6)
  assert np.all(bias[always_busy] < 0)


def test_a_router_forced_to_one_expert_is_rebalanced_by_the_bias():
  """Tokens all alike, the router preferring expert 0: its bias falls until others win."""
  cfgs = _cfgs({'data': 1}, model={'num_layers': 1})
  cfgs = cfgs._replace(model=dataclasses.replace(
      cfgs.model, moe=dataclasses.replace(cfgs.model.moe, aux_loss=0.0, z_loss=0.0,
                                          router='sigmoid', bias_rate=0.05)),
                       optimizer=dataclasses.replace(cfgs.optimizer, lr=1e-9))
  rules = _mesh_rules(cfgs.mesh)
  parts = step_parts(cfgs, rules)
  state, shardings = init_state(parts.model, parts.tx, cfgs.run.seq_len, rules, seed=0)
  params = jax.device_get(state.params)
  router = np.zeros_like(params['block_0']['mlp']['router'])
  router[:, 0] = 1.0  # Expert 0 scores highest for every token with a positive sum.
  params['block_0']['mlp']['router'] = router
  state = state.replace(params=jax.device_put(params, shardings.params))
  step = jit_train_step(parts.step_fn, shardings, rules, (8, 17))
  batch = Batch(np.full((8, 17), 5, np.int32))
  loads, biases = [], []
  for _ in range(12):
    state, m = step(state, batch)
    loads.append(jax.device_get(m['moe_load'])[0])
    biases.append(jax.device_get(state.params['block_0']['mlp'][moe.BIAS]))
  loads, biases = np.array(loads), np.array(biases)
  # 128 copies of one token: the two chosen experts take all of them at first.
  assert loads[0][0] == 128
  # Expert 0's bias falls on every step it is busier than the mean, rises on the others,
  # until another expert wins its tokens.
  over = np.sign(loads[:, 0] - loads.mean(axis=1))
  moved = np.sign(np.diff(np.concatenate([[0.0], biases[:, 0]])))
  np.testing.assert_array_equal(moved, -over)
  first_idle = int(np.argmax(loads[:, 0] == 0))
  assert first_idle > 0 and biases[first_idle - 1][0] < 0


def test_parameters_count_total_and_active():
  cfg = ModelConfig(**SMALL, moe=MOE)
  params = Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert flops.count_params(params) == flops.num_params(cfg)
  d, f, e = 32, 32, 8
  experts_per_layer = e * 3 * d * f
  active_per_layer = 2 * 3 * d * f
  assert flops.num_params(cfg) - flops.active_params(cfg) == 2 * (experts_per_layer
                                                                   - active_per_layer)
  dense = ModelConfig(**SMALL)
  assert flops.active_params(dense) == flops.num_params(dense)


@pytest.mark.parametrize('key, value, message', [
    ('experts_per_token', 9, 'model.moe.experts_per_token: must be in [1, num_experts=8]'),
    ('router', 'top1', 'model.moe.router: expected one of softmax, sigmoid'),
    ('aux_loss', -1.0, 'model.moe.aux_loss: must be >= 0'),
    ('every', 0, 'model.moe.every: must be >= 1'),
])
def test_bad_moe_keys_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
    ModelConfig(**SMALL, moe={**MOE, key: value})


def test_moe_refusals_name_the_key():
  with pytest.raises(ValueError, match='model.mlp: the experts of model.moe are SwiGLU'):
    ModelConfig(**SMALL, mlp='relu2', moe=MOE)
  with pytest.raises(ValueError, match='model.scan_layers: scanned layers must all be alike'):
    ModelConfig(**SMALL, scan_layers=True, moe={**MOE, 'first_dense_layers': 1})
  with pytest.raises(ValueError, match='unknown config key model.moe.experts'):
    ModelConfig(**SMALL, moe={'experts': 8})
  with pytest.raises(ValueError, match='mesh.expert: 3 does not divide model.moe.num_experts=8'):
    _cfgs({'expert': 3, 'data': 1})
