"""Mixture of experts: the grouped computation against the plain definition, expert
parallelism against one device, the balancing methods, and bad settings."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, tiny_moe
from data.batch import Batch
from lm.config import parse, set_key
from lm.mesh import MeshConfig
from lm.model import experts, flops, moe
from lm.model.config import ModelConfig
from lm.model.params import stack_layers
from lm.model.transformer import Transformer
from lm.sharding import AxisRules
from lm.train import trainer
from lm.train.step import init_state, jit_train_step, step_parts
from tests.helpers import cached_decode, read_metrics

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


def _grouped(impl):
  def fn(*args):
    y, dropped = experts.experts_local(*args, experts.Dispatch(impl))
    assert dropped == 0  # dropless: buffers of the worst case
    return y
  return fn


@pytest.mark.parametrize('k', [1, 2, E])
@pytest.mark.parametrize('kind', ['random', 'ties', 'unused'])
@pytest.mark.parametrize('router', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('impl', ['ragged', 'capacity'])
def test_grouped_experts_equal_the_dense_reference_with_gradients(k, kind, router, impl):
  ws, x = _weights()
  logits = _logits(kind)
  if kind == 'unused' and k < E:
    assert moe.route(logits, k, router).counts_E[3] == 0  # really an idle expert
  outs = {}
  for name, fn in (('grouped', _grouped(impl)), ('dense', experts.dense_reference)):
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
@pytest.mark.parametrize('impl', ['ragged', 'capacity'])
def test_expert_parallel_experts_equal_one_device(mesh, impl):
  ws, _ = _weights(1)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6, D))
  logits = _logits('ties')[:, :E].repeat(2, axis=0)  # 48 = 8 x 6 tokens
  r = moe.route(logits, 2, 'softmax')
  ex, mix = r.experts_NxK.reshape(8, 6, 2), r.weights_NxK.reshape(8, 6, 2)
  rules = _rules(**mesh)

  def loss(x, mix, ws, rules):
    y, dropped = experts.run_experts(x, ex, mix, ws, rules, experts.Dispatch(impl))
    return jnp.sum(jnp.sin(y)) + dropped

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
  if cfgs.model.scan_layers:  # Scanning draws other initial values: start from the same.
    unrolled = dataclasses.replace(cfgs.model, scan_layers=False, remat=False)
    params = Transformer(unrolled).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    state = state.replace(params=jax.device_put(
        stack_layers(nn.meta.unbox(params['params']), cfgs.model.num_layers),
        shardings.params))
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


SLOW = pytest.mark.slow


# One mesh in the fast tier; the others (each a compile of its own) in the whole suite.
@pytest.mark.parametrize('mesh', [pytest.param({'expert': 4}, marks=SLOW),
                                  {'data': 2, 'expert': 4},
                                  pytest.param({'fsdp': 2, 'expert': 4}, marks=SLOW),
                                  pytest.param({'data': 2, 'context': 2, 'expert': 2},
                                               marks=SLOW)])
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


@pytest.mark.slow
def test_scanned_rematerialised_layers_train_as_unrolled_ones(one_device):
  metrics, params = _train({'data': 1}, model={'scan_layers': True, 'remat': True})
  ref_metrics, ref_params = one_device
  np.testing.assert_allclose([m['loss'] for m in metrics], [m['loss'] for m in ref_metrics],
                             rtol=1e-5)
  np.testing.assert_array_equal(metrics[-1]['moe_load'], ref_metrics[-1]['moe_load'])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stack_layers(ref_params, 2))):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_micro_batches_see_the_batch_the_whole_batch_sees(one_device):
  cfgs = _cfgs({'data': 1}, lr=1e-3)
  cfgs = cfgs._replace(optimizer=dataclasses.replace(cfgs.optimizer, grad_accum=2))
  rules = _mesh_rules(cfgs.mesh)
  parts = step_parts(cfgs, rules)
  state, shardings = init_state(parts.model, parts.tx, cfgs.run.seq_len, rules, seed=0)
  step = jit_train_step(parts.step_fn, shardings, rules, (8, 17))
  tokens = np.random.default_rng(0).integers(0, 256, (3, 8, 17)).astype(np.int32)
  _, m = step(state, Batch(tokens[0]))
  ref = one_device[0][0]
  np.testing.assert_allclose(m['loss'], ref['loss'], rtol=1e-6)  # the same parameters
  # Counts are means over the micro-batches: the whole batch's over 2.
  np.testing.assert_allclose(np.asarray(m['moe_load']) * 2, ref['moe_load'])


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


DECODE = ModelConfig(**{**SMALL, 'vocab_size': 64}, tie_embeddings=False,
                     moe={**MOE, 'bias_rate': 0.0, 'num_shared_experts': 1})


def _decode_params(cfg):
  shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']))
  rng = np.random.default_rng(0)

  def draw(path, x):
    if path[-1].key == 'scale':
      return np.ones(x.shape, x.dtype)
    fan_in = x.shape[-2] if x.ndim > 1 else 1
    std = 1.0 if path[-1].key in ('embed', 'router') else 1 / np.sqrt(fan_in)
    return rng.normal(0, std, x.shape).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize('scan', [False, pytest.param(True, marks=SLOW)],
                         ids=['plain', 'scanned'])
def test_cached_decoding_with_experts_matches_recomputing_the_whole_sequence(scan):
  cfg = dataclasses.replace(DECODE, scan_layers=scan)
  params = _decode_params(DECODE)
  if scan:
    params = stack_layers(params, cfg.num_layers)
  prompts = [[2, 11, 12, 13, 14, 15], [2, 21], [2, 31, 32, 33]]
  more = np.array([[40, 41, 42], [43, 44, 45], [46, 47, 48]], np.int32)
  prefill, decoded, p = cached_decode(Transformer(cfg), params, prompts, more)
  rows = np.zeros((3, 16), np.int32)
  for i, (prompt, row) in enumerate(zip(prompts, more)):
    rows[i, :len(prompt) + 3] = prompt + row.tolist()
  want = np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray(rows)))
  for r, prompt in enumerate(prompts):
    n = len(prompt)
    np.testing.assert_allclose(prefill[r, p - n:], want[r, :n], rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(decoded):
      np.testing.assert_allclose(logits[r], want[r, n + i], rtol=1e-5, atol=1e-5)


def _run_config(workdir, tokenizer, mesh):
  c = tiny_moe.get_config()
  settings = {'workdir': str(workdir), 'data.tokenizer': tokenizer, 'steps': 6,
              'log_every': 1, 'eval_every': 0, 'checkpoint_every': 3, 'keep_checkpoints': 5,
              'seq_len': 16, 'data.eval_fraction': 0.0, 'model.vocab_size': 512,
              'model.d_model': 32, 'model.num_heads': 4, 'model.num_kv_heads': 2,
              'model.num_layers': 2, 'model.d_ff': 64, 'model.moe.expert_d_ff': 32,
              'model.moe.bias_rate': 0.01, 'model.moe.z_loss': 0.001, **mesh}
  for key, text in settings.items():
    set_key(c, key, repr(text) if isinstance(text, str) else str(text))
  return c


def _train_losses(workdir):
  return {m['step']: m['loss'] for m in read_metrics(workdir) if 'loss' in m}


@pytest.mark.slow
def test_resume_with_experts_is_bit_exact_and_moves_across_the_expert_axis(tmp_path,
                                                                          tokenizer):
  ep = {'mesh.data': 2, 'mesh.expert': 4}
  straight = tmp_path / 'straight'
  trainer.train(_run_config(straight, tokenizer, ep), handle_signals=False)
  want = _train_losses(straight)
  states = {}
  for name, mesh in (('same', ep), ('one_expert_device', {'mesh.data': 8, 'mesh.expert': 1})):
    run = tmp_path / name
    shutil.copytree(straight, run)
    shutil.rmtree(run / 'checkpoints' / '6')
    lines = (run / 'metrics.jsonl').read_text().splitlines(keepends=True)
    (run / 'metrics.jsonl').write_text(''.join(x for x in lines if json.loads(x)['step'] <= 3))
    exp = trainer.build(_run_config(run, tokenizer, mesh))
    exp.close()
    assert exp.start_step == 3
    states[name] = jax.device_get(exp.state)
    bias = states[name].params['block_0']['mlp'][moe.BIAS]
    assert np.abs(bias).max() > 0  # the balancing state came back, not zeros
    trainer.train(_run_config(run, tokenizer, mesh), handle_signals=False)
    got = _train_losses(run)
    if name == 'same':
      assert got == want  # bit for bit
    else:
      np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                                 rtol=1e-5)
  # The same step-3 state on either mesh, router biases and Adam moments included.
  for a, b in zip(jax.tree.leaves(states['same']), jax.tree.leaves(states['one_expert_device'])):
    np.testing.assert_array_equal(a, b)


def test_a_capacity_drops_the_later_copies_of_a_full_expert():
  ws, x = _weights(2)
  logits = _logits('random').at[:, 5].add(3.0)  # expert 5 wanted by nearly every token
  r = moe.route(logits, 2, 'softmax')
  factor = 1.0  # slots = ceil(N K / E) = 6 per expert
  y, dropped = experts.experts_local(x, r.experts_NxK, r.weights_NxK, ws,
                                     experts.Dispatch('capacity', factor))
  # By hand: copy m = n K + j; an expert keeps its first 6 copies in that order.
  flat = np.asarray(r.experts_NxK).reshape(-1)
  seen, keep = {}, np.zeros(flat.shape, bool)
  for m, e in enumerate(flat):
    seen[e] = seen.get(e, 0) + 1
    keep[m] = seen[e] <= 6
  assert int(dropped) == (~keep).sum() > 0
  kept_weights = np.where(keep.reshape(N, 2), np.asarray(r.weights_NxK), 0.0)
  want = experts.dense_reference(x, r.experts_NxK, jnp.asarray(kept_weights), ws)
  np.testing.assert_allclose(y, want, atol=1e-5)
  # A factor at the worst case drops nothing.
  _, none = experts.experts_local(x, r.experts_NxK, r.weights_NxK, ws,
                                  experts.Dispatch('capacity', float(E)))
  assert int(none) == 0


def _exchange_drops(experts_BxTxK, data, ep, e, factor):
  """(copies the senders drop, copies the receivers' experts drop) in experts_exchanged,
  simulated: rows split over (data, expert)."""
  b, t, k = experts_BxTxK.shape
  per, n = e // ep, b * t // (data * ep)
  c = min(n * min(k, per), int(np.ceil(factor * n * k / ep)))
  slots = min(ep * min(n, c), int(np.ceil(factor * n * k / per)))
  blocks = experts_BxTxK.reshape(data, ep, n * k)
  dropped = [0, 0]
  for g in range(data):
    inbox = [[] for _ in range(ep)]  # per destination: (source, slot, local expert)
    for s in range(ep):
      sent = [0] * ep
      for ex in blocks[g, s]:
        d = ex // per
        if sent[d] < c:
          inbox[d].append((s, sent[d], ex % per))
        else:
          dropped[0] += 1
        sent[d] += 1
    for d in range(ep):
      used = [0] * per
      for _, _, ex in sorted(inbox[d]):
        dropped[1] += used[ex] >= slots
        used[ex] += 1
  return dropped


@pytest.mark.parametrize('impl', ['ragged', 'capacity'])
def test_exchange_buffers_drop_what_a_simulation_of_them_drops(impl):
  ws, _ = _weights(1)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6, D))
  logits = _logits('random').repeat(2, axis=0).at[:, 6].add(2.0)
  r = moe.route(logits, 2, 'softmax')
  ex, mix = r.experts_NxK.reshape(8, 6, 2), r.weights_NxK.reshape(8, 6, 2)
  factor = 1.0
  _, dropped = jax.jit(lambda: experts.run_experts(
      x, ex, mix, ws, _rules(expert=4, data=2), experts.Dispatch(impl, factor)))()
  senders, receivers = _exchange_drops(np.asarray(ex), 2, 4, E, factor)
  assert senders > 0 and receivers > 0
  # ragged has no per-expert buffer: only the exchange's bound drops.
  assert int(dropped) == (senders if impl == 'ragged' else senders + receivers)


def test_a_batch_the_expert_axis_cannot_split_is_refused_by_key():
  cfgs = _cfgs({'data': 2, 'expert': 4}, batch_size=4)
  with pytest.raises(ValueError, match=r'^batch_size: each \(micro-\)batch of 4 rows must split '
                                       r'over mesh.data x fsdp x expert = 8 devices'):
    step_parts(cfgs, _mesh_rules(cfgs.mesh))


def test_quantising_an_moe_model_is_refused_by_key():
  from lm.eval.quantize import QuantConfig
  model = Transformer(ModelConfig(**SMALL, moe=MOE))
  QuantConfig().check_shapes(model)  # float weights: fine
  for mode in ('int8', 'int4'):
    with pytest.raises(ValueError, match=rf'^--quantize={mode}: model.moe.num_experts=8: '):
      QuantConfig(mode).check_shapes(model)


def test_a_resume_may_change_how_experts_run_but_not_what_they_are():
  from lm.run.meta import incompatibilities
  saved = {'model': {'d_model': 8, 'moe': dataclasses.asdict(ModelConfig(moe=MOE).moe)}}
  runtime = {**MOE, 'impl': 'capacity', 'capacity_factor': 1.25, 'aux_loss': 0.0,
             'z_loss': 0.0}
  assert incompatibilities(saved, {'model': {'d_model': 8, 'moe': runtime}}) == []
  assert incompatibilities(saved, {'model': {'d_model': 8, 'moe': {**MOE, 'num_experts': 4}}}
                           ) == ['model.moe.num_experts: 8 in checkpoint, 4 now']
  # A checkpoint written before model.moe existed holds a dense model.
  assert ('model.moe.num_experts: 0 in checkpoint, 8 now' in incompatibilities(
      {'model': {'d_model': 8}}, {'model': {'d_model': 8, 'moe': MOE}}))
