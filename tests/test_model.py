"""Model invariants: causality, GQA, RoPE, remat/scan equivalence, a naive reference."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import flops
from lm.model.loss import cross_entropy
from lm.model.params import stack_layers, unstack_layers
from lm.model.positions import rope, segment_positions
from lm.model.transformer import (
  Attention,
  ModelConfig,
  Transformer,
)

SMALL = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=96, tie_embeddings=False)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(cfg, seed=0, seq_len=16):
  params = Transformer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, seq_len), jnp.int32))
  return nn.meta.unbox(params)['params']


# Jitted: op-by-op dispatch of a whole model is slow on the CPU.
@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, positions=None):
  return Transformer(cfg).apply({'params': params}, tokens, positions)


def _tokens(shape, seed=1, vocab=128):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def test_causal_future_tokens_do_not_change_past_logits():
  params = _init(SMALL)
  tokens = _tokens((2, 16))
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 128)
  a = _apply(SMALL, params, tokens)
  b = _apply(SMALL, params, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
  # ...and the change is visible from position 10 on, so the check has teeth.
  assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3


def test_causal_through_gradients():
  # d(logits at position 5) / d(embedding rows) is zero for tokens seen only later.
  params = _init(SMALL)
  tokens = _tokens((1, 16))

  def logits_at_5(embed):
    p = {**params, 'embed': embed}
    return _apply(SMALL, p, tokens)[0, 5].sum()

  grad_V = jax.grad(logits_at_5)(params['embed'])
  later = set(np.asarray(tokens[0, 6:]).tolist()) - set(np.asarray(tokens[0, :6]).tolist())
  assert later
  for tok in later:
    assert not np.any(np.asarray(grad_V[tok])), f'token {tok} after position 5 leaked'
  assert np.any(np.asarray(grad_V[int(tokens[0, 0])]))


def test_segment_positions_restart_at_each_document():
  seg = jnp.array([[1, 1, 1, 2, 2, 3], [1, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize('scan', [False, True])
def test_packed_documents_see_only_themselves(scan):
  # Two documents packed into one row with segment ids give each document the logits
  # it gets alone: attention stays inside a document and positions restart at 0.
  cfg = dataclasses.replace(SMALL, scan_layers=scan)
  params = _init(cfg)
  first, second = _tokens((1, 6), seed=2), _tokens((1, 10), seed=3)
  packed = jnp.concatenate([first, second], axis=1)
  segments = jnp.array([[1] * 6 + [2] * 10])

  @jax.jit
  def apply(params, tokens, segment_ids=None):
    return Transformer(cfg).apply({'params': params}, tokens, segment_ids_BxT=segment_ids)

  together = apply(params, packed, segments)
  np.testing.assert_allclose(together[:, :6], apply(params, first), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(together[:, 6:], apply(params, second), rtol=1e-5, atol=1e-5)
  # Without the ids the second document sees the first: the check has teeth.
  plain = apply(params, packed)
  assert np.abs(np.asarray(plain[:, 6:] - together[:, 6:])).max() > 1e-3


def test_gqa_equals_multi_head_with_repeated_kv_heads():
  gqa = SMALL
  mha = dataclasses.replace(SMALL, num_kv_heads=SMALL.num_heads)
  params = _init(gqa)
  groups = gqa.num_heads // gqa.num_kv_heads
  mha_params = jax.tree.map(lambda x: x, params)
  for i in range(gqa.num_layers):
    attn = dict(params[f'block_{i}']['attn'])
    # Query head n reads kv head n // groups (the Hugging Face repeat_kv layout).
    attn['k'] = jnp.repeat(attn['k'], groups, axis=1)
    attn['v'] = jnp.repeat(attn['v'], groups, axis=1)
    mha_params[f'block_{i}'] = {**params[f'block_{i}'], 'attn': attn}
  tokens = _tokens((2, 16))
  a = _apply(gqa, params, tokens)
  b = _apply(mha, mha_params, tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 32))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 32))

  def score(m, n):
    qm = rope(q, jnp.array([[m]]), 10000.0)
    kn = rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(qm * kn))

  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
  assert score(5, 2) == pytest.approx(score(3, 0), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
  # Position 0 is the identity rotation.
  np.testing.assert_allclose(rope(q, jnp.array([[0]]), 10000.0), q, rtol=1e-6)


def test_model_is_invariant_to_a_shift_of_all_positions():
  params = _init(SMALL)
  tokens = _tokens((2, 16))
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  a = _apply(SMALL, params, tokens, pos)
  b = _apply(SMALL, params, tokens, pos + 37)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('remat,scan', [(True, False), (False, True), (True, True)])
def test_remat_and_scan_match_the_plain_model(remat, scan):
  params = _init(SMALL)
  variant = dataclasses.replace(SMALL, remat=remat, scan_layers=scan)
  vparams = stack_layers(params, SMALL.num_layers) if scan else params
  tokens = _tokens((2, 16))

  def loss(cfg, p):
    logits = _apply(cfg, p, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])[0]

  l0, g0 = jax.value_and_grad(loss, argnums=1)(SMALL, params)
  l1, g1 = jax.value_and_grad(loss, argnums=1)(variant, vparams)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  if scan:
    g1 = unstack_layers(g1, SMALL.num_layers)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_init_has_the_plain_structure_stacked():
  plain = _init(SMALL)
  scanned = _init(dataclasses.replace(SMALL, scan_layers=True))
  expect = jax.tree.map(lambda x: x.shape, stack_layers(plain, SMALL.num_layers))
  assert jax.tree.map(lambda x: x.shape, scanned) == expect


def _naive_attention(x, p, cfg, positions):
  """Attention written out with loops over heads in float64: the reference."""
  x = np.asarray(x, np.float64)
  q = np.einsum('btd,dnh->btnh', x, np.asarray(p['q'], np.float64))
  k = np.einsum('btd,dkh->btkh', x, np.asarray(p['k'], np.float64))
  v = np.einsum('btd,dkh->btkh', x, np.asarray(p['v'], np.float64))
  h = q.shape[-1]

  def rot(a):
    inv = cfg.rope_theta ** (-np.arange(0, h, 2) / h)
    ang = positions[:, :, None, None] * inv
    a1, a2 = a[..., : h // 2], a[..., h // 2:]
    return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                           a2 * np.cos(ang) + a1 * np.sin(ang)], -1)

  q, k = rot(q), rot(k)
  b, t, n, _ = q.shape
  groups = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for head in range(n):
      kv = head // groups
      for i in range(t):
        s = np.array([q[bi, i, head] @ k[bi, j, kv] / np.sqrt(h) for j in range(i + 1)])
        w = np.exp(s - s.max())
        w /= w.sum()
        out[bi, i, head] = sum(w[j] * v[bi, j, kv] for j in range(i + 1))
  return np.einsum('btnh,nhd->btd', out, np.asarray(p['o'], np.float64))


def test_attention_matches_a_naive_reference():
  cfg = SMALL
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  module = Attention(cfg, None, True)
  p = nn.meta.unbox(module.init(jax.random.PRNGKey(4), x, pos))['params']
  got = module.apply({'params': p}, x, pos)
  want = _naive_attention(x, p, cfg, np.asarray(pos, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rmsnorm_and_loss_on_hand_derivable_inputs():
  # A zero model: every logit is 0, so the loss is log V exactly and log Z = log V.
  params = jax.tree.map(jnp.zeros_like, _init(SMALL))
  tokens = _tokens((2, 9))
  logits = _apply(SMALL, params, tokens[:, :-1])
  loss, aux = cross_entropy(logits, tokens[:, 1:], z_loss=1e-2)
  log_v = np.log(SMALL.vocab_size)
  assert float(aux['loss']) == pytest.approx(log_v, rel=1e-6)
  assert float(loss) == pytest.approx(log_v + 1e-2 * log_v**2, rel=1e-6)
  # Two logits [0, ln 3]: p(target=1) = 3/4.
  logits2 = jnp.array([[[0.0, np.log(3.0)]]])
  assert float(cross_entropy(logits2, jnp.array([[1]]))[0]) == pytest.approx(-np.log(0.75))


def test_param_count_formula_matches_the_initialised_tree():
  for tie in (True, False):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie)
    assert flops.count_params(_init(cfg)) == flops.num_params(cfg)


def test_flops_per_token_is_the_palm_formula():
  cfg = SMALL
  n = flops.num_params(cfg) - cfg.vocab_size * cfg.d_model  # untied: lookup is free
  t = 16
  expect = 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * t
  assert flops.flops_per_token(cfg, t) == expect
  assert flops.flops_per_token(cfg, t, causal=True) == 6 * n + 6 * cfg.num_layers * cfg.d_model * t


def test_parameters_carry_logical_axis_names():
  boxed = Transformer(SMALL).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['embed']) == ('vocab', 'embed')
  assert tuple(specs['head']) == ('embed', 'vocab')
  assert tuple(specs['block_0']['attn']['q']) == ('embed', 'heads', 'head_dim')
  assert tuple(specs['block_0']['attn']['k']) == ('embed', 'kv_heads', 'head_dim')
  assert tuple(specs['block_0']['mlp']['down']) == ('mlp', 'embed')
  scanned = Transformer(dataclasses.replace(SMALL, scan_layers=True)).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  specs = nn.get_partition_spec(scanned)['params']
  assert tuple(specs['blocks']['mlp']['gate']) == ('layers', 'embed', 'mlp')


def test_dropout_is_active_only_in_training():
  cfg = dataclasses.replace(SMALL, dropout=0.5)
  params = _init(cfg)
  tokens = _tokens((1, 16))
  model = Transformer(cfg)
  e1 = model.apply({'params': params}, tokens)
  e2 = model.apply({'params': params}, tokens)
  np.testing.assert_array_equal(e1, e2)
  t1 = model.apply({'params': params}, tokens, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  t2 = model.apply({'params': params}, tokens, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(t1 - t2)).max() > 1e-3


def test_bf16_compute_keeps_float32_params():
  cfg = dataclasses.replace(SMALL, dtype='bfloat16')
  params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = _apply(cfg, params, _tokens((1, 8)))
  assert logits.dtype == jnp.bfloat16
  ref = _apply(SMALL, params, _tokens((1, 8)))
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref, atol=0.1)


@pytest.mark.parametrize('key,value,message', [
    ('num_kv_heads', 3, 'model.num_kv_heads'),
    ('attention', 'flash', 'model.attention'),
    ('dtype', 'float8', 'model.dtype'),
    ('remat_policy', 'no_such_policy', 'model.remat_policy'),
])
def test_bad_model_config_names_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(SMALL, **{key: value})
