"""The chunked cross-entropy equals the plain one in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.mesh import MeshConfig
from lm.model.loss import (
  chunk_length,
  chunked_cross_entropy,
  chunked_token_nll,
  cross_entropy,
  loss_weights,
  token_nll,
)
from lm.sharding import AxisRules

B, T, D, V = 2, 12, 8, 40
# The project's default logical-axis rules, as every config has them.
RULES = MeshConfig.from_dict(base.get_config().mesh).rules


def _inputs(dtype=jnp.float32, seed=0):
  kx, kw, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (B, T, D), dtype)
  head = jax.random.normal(kw, (D, V), dtype)
  targets = jax.random.randint(kt, (B, T), 0, V)
  return x, head, targets


def _plain(x, head, targets, z_loss):
  logits = jnp.einsum('btd,dv->btv', x, head, preferred_element_type=jnp.float32)
  return cross_entropy(logits, targets, z_loss)


@pytest.mark.parametrize('chunk', [1, 4, 5, 12, 0])
@pytest.mark.parametrize('z_loss', [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk, z_loss):
  x, head, targets = _inputs()
  plain = jax.value_and_grad(lambda x, h, t: _plain(x, h, t, z_loss), argnums=(0, 1),
                             has_aux=True)
  chunked = jax.value_and_grad(
      lambda x, h, t: chunked_cross_entropy(x, h, t, chunk=chunk, z_loss=z_loss),
      argnums=(0, 1), has_aux=True)
  (loss_a, aux_a), grads_a = jax.jit(plain)(x, head, targets)
  (loss_b, aux_b), grads_b = jax.jit(chunked)(x, head, targets)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  np.testing.assert_allclose(aux_b['loss'], aux_a['loss'], rtol=1e-6)
  np.testing.assert_allclose(aux_b['z_loss'], aux_a['z_loss'], rtol=1e-6)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # The z-loss term reaches the gradient (checked against the plain loss above).
  assert float(aux_a['z_loss']) > 0


def test_loss_scale_reaches_the_chunked_gradient():
  # The custom backward pass multiplies by the incoming cotangent.
  x, head, targets = _inputs()
  g1 = jax.grad(lambda x: chunked_cross_entropy(x, head, targets, chunk=4)[0])(x)
  g3 = jax.grad(lambda x: 3.0 * chunked_cross_entropy(x, head, targets, chunk=4)[0])(x)
  np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-6)


def test_chunked_token_nll_equals_the_plain_one():
  x, head, targets = _inputs()
  logits = jnp.einsum('btd,dv->btv', x, head)
  for got, want in zip(chunked_token_nll(x, head, targets, 5), token_nll(logits, targets)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bf16_chunked_loss_is_float32_accurate():
  # bf16 inputs, float32 softmax: the chunked loss matches the float32 loss of the same
  # bf16 values as closely as the plain bf16-logits path does, or closer.
  x, head, targets = _inputs(jnp.bfloat16)
  exact = _plain(x.astype(jnp.float32), head.astype(jnp.float32), targets, 0.0)[0]
  chunked = chunked_cross_entropy(x, head, targets, chunk=4)[0]
  bf16_logits = cross_entropy(jnp.einsum('btd,dv->btv', x, head), targets)[0]
  assert abs(float(chunked) - float(exact)) <= abs(float(bf16_logits) - float(exact)) + 1e-6
  assert abs(float(chunked) - float(exact)) < 1e-3


def test_chunk_length_is_the_largest_divisor_not_above_the_setting():
  assert [chunk_length(12, c) for c in (0, 1, 4, 5, 7, 12, 99)] == [12, 1, 4, 4, 6, 12, 12]
  assert chunk_length(1024, 256) == 256


def _collectives_in_loop(rules, shape):
  """Collectives XLA placed inside the chunk loop of the loss's gradient."""
  b, t, d, v = 16, 64, 32, 256
  mesh_rules = AxisRules.from_config(MeshConfig(*shape, rules=RULES))
  x = jax.device_put(jnp.ones((b, t, d)), mesh_rules.sharding(('batch', 'length', 'embed'),
                                                              (b, t, d)))
  head = jax.device_put(jnp.ones((d, v)), mesh_rules.sharding(('embed', 'vocab'), (d, v)))
  targets = jax.device_put(jnp.zeros((b, t), jnp.int32),
                           mesh_rules.sharding(('batch', 'length'), (b, t)))
  loss = lambda x, h: chunked_cross_entropy(x, h, targets, chunk=8,
                                            rules=mesh_rules if rules else None)[0]
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, head).compile().as_text()
  return [line for line in hlo.splitlines() if 'while/body' in line
          and any(op in line for op in ('all-reduce(', 'all-gather(', 'reduce-scatter('))]


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1), (2, 1, 1, 4), (1, 1, 1, 8)])
def test_data_parallel_chunks_communicate_once_not_per_chunk(shape):
  # Without the mesh the head's gradient is reduced across devices inside every chunk
  # (the control: the check can see it); with it, once after the loop. With rows split
  # on `context` each step takes a chunk of every device's share: none is gathered.
  assert _collectives_in_loop(False, shape)
  assert not _collectives_in_loop(True, shape)


@pytest.mark.parametrize('chunk', [2, 0])
def test_chunks_of_rows_split_on_context_give_the_plain_loss(chunk):
  rules = AxisRules.from_config(MeshConfig(data=2, context=4, rules=RULES))
  x, head, targets = (jax.random.normal(jax.random.PRNGKey(1), (B, 16, D)), _inputs()[1],
                      jax.random.randint(jax.random.PRNGKey(2), (B, 16), 0, V))
  weights = loss_weights(jnp.arange(B * 16).reshape(B, 16) % 3 > 0)
  x, targets, weights = (jax.device_put(a, rules.sharding(('batch', 'length', 'embed')[:a.ndim],
                                                          a.shape))
                         for a in (x, targets, weights))
  plain = jax.grad(lambda x, h: cross_entropy(
      jnp.einsum('btd,dv->btv', x, h), targets, 1e-2, weights)[0], argnums=(0, 1))
  ours = jax.value_and_grad(lambda x, h: chunked_cross_entropy(
      x, h, targets, chunk=chunk, z_loss=1e-2, rules=rules, weights_BxT=weights)[0],
      argnums=(0, 1))
  want = cross_entropy(jnp.einsum('btd,dv->btv', x, head), targets, 1e-2, weights)[0]
  got, grads = jax.jit(ours)(x, head)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.jit(plain)(x, head), grads):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  nll = jax.jit(lambda x: chunked_token_nll(x, head, targets, chunk, rules)[0])(x)
  np.testing.assert_allclose(nll, token_nll(jnp.einsum('btd,dv->btv', x, head), targets)[0],
                             rtol=1e-6)


@pytest.mark.parametrize('chunk', [4, 0])
def test_weighted_loss_is_the_mean_over_masked_tokens(chunk):
  x, head, targets = _inputs()
  mask = np.zeros((B, T), np.int32)
  mask[0, 3:7], mask[1, 10:] = 1, 1  # Six trained tokens.
  weights = loss_weights(jnp.asarray(mask))
  logits = np.einsum('btd,dv->btv', np.asarray(x, np.float64), np.asarray(head, np.float64))
  log_z = np.log(np.exp(logits).sum(-1))
  nll = log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  want = nll[mask == 1].mean()
  z_want = (log_z[mask == 1] ** 2).mean()

  def loss(x, h):
    if chunk:
      return chunked_cross_entropy(x, h, targets, chunk=chunk, z_loss=1e-2, weights_BxT=weights)
    logits = jnp.einsum('btd,dv->btv', x, h, preferred_element_type=jnp.float32)
    return cross_entropy(logits, targets, 1e-2, weights)

  (total, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, head)
  np.testing.assert_allclose(aux['loss'], want, rtol=1e-5)
  np.testing.assert_allclose(aux['z_loss'], z_want, rtol=1e-5)
  np.testing.assert_allclose(total, want + 1e-2 * z_want, rtol=1e-5)
  # Untrained tokens get no gradient; trained ones do.
  dx = np.abs(np.asarray(grads[0])).sum(-1)
  assert (dx[mask == 0] == 0).all() and (dx[mask == 1] > 0).all()
  if chunk:  # The chunked gradient equals the plain one.
    plain = jax.grad(lambda x, h: cross_entropy(
        jnp.einsum('btd,dv->btv', x, h, preferred_element_type=jnp.float32), targets, 1e-2,
        weights)[0], argnums=(0, 1))(x, head)
    for a, b in zip(plain, grads):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('chunk', [5, 0])
def test_soft_capped_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
  x, head, targets = _inputs()
  cap = 2.0  # Logits here have a spread of about 3: the cap bites.

  def plain(x, h, t):
    logits = jnp.einsum('btd,dv->btv', x, h, preferred_element_type=jnp.float32)
    return cross_entropy(cap * jnp.tanh(logits / cap), t, 1e-2)

  def chunked(x, h, t):
    return chunked_cross_entropy(x, h, t, chunk=chunk, z_loss=1e-2, softcap=cap)

  (loss_a, _), grads_a = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(x, head, targets)
  (loss_b, _), grads_b = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(
      x, head, targets)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert abs(float(loss_a) - float(_plain(x, head, targets, 1e-2)[0])) > 1e-2  # It bites.
  logits = cap * jnp.tanh(jnp.einsum('btd,dv->btv', x, head) / cap)
  for got, want in zip(chunked_token_nll(x, head, targets, 5, softcap=cap),
                       token_nll(logits, targets)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
