"""Schedules, the weight-decay mask and clipping, against hand-computed values; Muon's
choice of parameters and the matrix it sees in each."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

from lm.optim.optimizer import (
  OptimizerConfig,
  decay_mask,
  make_optimizer,
  muon_dimensions,
  schedule,
)


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
  cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule='cosine')
  lr = schedule(cfg, 110)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  # Halfway through the cosine: (1 + 0.1) / 2.
  assert float(lr(60)) == pytest.approx(0.55, rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)


def test_wsd_schedule_holds_then_decays_linearly():
  cfg = OptimizerConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule='wsd', decay_fraction=0.2)
  lr = schedule(cfg, 100)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(79)) == pytest.approx(1.0)
  assert float(lr(90)) == pytest.approx(0.5)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)


def test_constant_schedule():
  lr = schedule(OptimizerConfig(lr=0.3, warmup_steps=4, schedule='constant'), 100)
  assert [round(float(lr(s)), 6) for s in (0, 2, 4, 50, 99)] == [0.0, 0.15, 0.3, 0.3, 0.3]


def test_decay_mask_skips_norm_scales_even_when_stacked():
  params = {'embed': jnp.ones((4, 2)), 'blocks': {'attn_norm': {'scale': jnp.ones((3, 2))},
                                                  'mlp': {'up': jnp.ones((3, 2, 5))}}}
  mask = decay_mask(params)
  assert mask == {'embed': True, 'blocks': {'attn_norm': {'scale': False}, 'mlp': {'up': True}}}


def test_weight_decay_applies_only_where_masked():
  # With zero gradients Adam's update is 0, so what moves is weight decay alone:
  # p <- p - lr * wd * p.
  cfg = OptimizerConfig(lr=0.1, warmup_steps=0, schedule='constant', weight_decay=0.5,
                        clip_norm=0.0)
  tx = make_optimizer(cfg, 10)
  params = {'w': jnp.full((2, 2), 2.0), 'norm': {'scale': jnp.full((2,), 2.0)}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['w'], 2.0 - 0.1 * 0.5 * 2.0)
  np.testing.assert_allclose(new['norm']['scale'], 2.0)


def test_clipping_scales_the_gradient_to_clip_norm():
  # With b1 = 0 and a huge eps, Adam's update is -lr * g / eps: linear in the gradient,
  # so the clip shows as a factor of clip_norm / |g| = 1 / 5.
  def update(clip_norm):
    cfg = OptimizerConfig(lr=1.0, warmup_steps=0, schedule='constant', weight_decay=0.0,
                          clip_norm=clip_norm, b1=0.0, b2=0.0, eps=1e6)
    tx = make_optimizer(cfg, 10)
    params = {'w': jnp.zeros((2,))}
    updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(params), params)
    return np.asarray(updates['w'])

  np.testing.assert_allclose(update(1.0), update(0.0) / 5, rtol=1e-5)
  np.testing.assert_allclose(update(10.0), update(0.0), rtol=1e-5)


# Muon: which parameters it takes, and the matrix each one is.

L, D, N, H, V = 3, 16, 4, 8, 40  # N * H = 32 != D, so a wrong fold changes shapes' scales.
AXES = {'blocks': {'attn': {'q': ('layers', 'embed', 'heads', 'head_dim'),
                            'o': ('layers', 'heads', 'head_dim', 'embed')},
                   'mlp': {'down': ('layers', 'mlp', 'embed')},
                   'attn_norm': {'scale': ('layers', 'embed')}},
        'embed': ('vocab', 'embed'), 'head': ('embed', 'vocab')}
SHAPES = {'blocks': {'attn': {'q': (L, D, N, H), 'o': (L, N, H, D)}, 'mlp': {'down': (L, 24, D)},
                     'attn_norm': {'scale': (L, D)}},
          'embed': (V, D), 'head': (D, V)}
MUON = OptimizerConfig(name='muon', lr=0.1, muon_lr=0.05, warmup_steps=0, schedule='constant',
                       weight_decay=0.0, clip_norm=0.0)


def test_muon_dimensions_follow_the_logical_axis_names():
  M = MuonDimensionNumbers
  assert muon_dimensions(('embed', 'heads', 'head_dim')) == M(0, (1, 2))
  assert muon_dimensions(('layers', 'embed', 'kv_heads', 'head_dim')) == M(1, (2, 3))
  assert muon_dimensions(('layers', 'heads', 'head_dim', 'embed')) == M((1, 2), 3)
  assert muon_dimensions(('embed', 'mlp')) == M(0, (1,))
  assert muon_dimensions(('layers', 'mlp', 'embed')) == M((1,), 2)
  for names in (('vocab', 'embed'), ('embed', 'vocab'), ('embed',), ('layers', 'embed')):
    assert muon_dimensions(names) is None  # AdamW's
  with pytest.raises(ValueError, match="'embed' first or last"):
    muon_dimensions(('heads', 'embed', 'head_dim'))


def _newton_schulz(g: np.ndarray, steps: int = 5, scaling: str = 'frobenius') -> np.ndarray:
  """Muon's orthogonalisation, as modded-nanogpt writes it, in float64 numpy; `scaling`
  is how the (wide) matrix is brought near unit spectral norm first: by its Frobenius
  norm, its Schatten-4 norm (|X X^T|_F ** 0.5), or AOL's rows (each by the square root of
  its row of |X X^T| summed)."""
  a, b, c = 3.4445, -4.7750, 2.0315
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  if scaling == 'frobenius':
    x = x / (np.linalg.norm(x) + 1e-8)
  elif scaling == 'schatten':
    x = x / np.sqrt(np.linalg.norm(x @ x.T))
  elif scaling == 'aol':
    x = x / np.sqrt(np.abs(x @ x.T).sum(axis=1, keepdims=True))
  for _ in range(steps):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if tall else x


def _first_updates(cfg, grads):
  params = jax.tree.map(jnp.ones, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  tx = make_optimizer(cfg, 10, AXES)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(np.asarray, updates)


def test_muon_orthogonalises_one_matrix_per_layer_with_the_heads_folded():
  """A stacked q is L matrices D x (N*H), the output projection L of (N*H) x D."""
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                       is_leaf=lambda x: isinstance(x, tuple))
  updates = _first_updates(MUON, grads)
  g_q, u_q = np.float64(grads['blocks']['attn']['q']), updates['blocks']['attn']['q']
  g_o, u_o = np.float64(grads['blocks']['attn']['o']), updates['blocks']['attn']['o']
  # On the first step Nesterov momentum is a multiple of the gradient, and the
  # orthogonalisation ignores scale; wide matrices are scaled by sqrt(fan_out / fan_in).
  want_q = np.stack([_newton_schulz(g.reshape(D, N * H)).reshape(D, N, H) for g in g_q])
  want_o = np.stack([_newton_schulz(g.reshape(N * H, D)).reshape(N, H, D) for g in g_o])
  np.testing.assert_allclose(u_q, -0.05 * np.sqrt(N * H / D) * want_q, atol=2e-5)
  np.testing.assert_allclose(u_o, -0.05 * want_o, atol=2e-5)
  # Controls: one matrix across the layers, or one per head, is a different update.
  across = _newton_schulz(g_q.reshape(L * D, N * H)).reshape(L, D, N, H)
  per_head = np.stack([[_newton_schulz(g[:, n]) for n in range(N)] for g in g_q])
  for wrong in (across, per_head.transpose(0, 2, 1, 3)):
    assert np.abs(u_q / (-0.05 * np.sqrt(N * H / D)) - wrong).max() > 0.1


def test_muon_ns_steps_sets_the_newton_schulz_iterations():
  """Fewer iterations leave the update further from orthogonal: the reference at 2, not 5."""
  rng = np.random.default_rng(2)
  grads = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                       is_leaf=lambda x: isinstance(x, tuple))
  u = _first_updates(dataclasses.replace(MUON, muon_ns_steps=2), grads)['blocks']['mlp']['down']
  g = np.float64(grads['blocks']['mlp']['down'])
  want = {k: np.stack([_newton_schulz(m, steps=k) for m in g]) for k in (2, 5)}
  np.testing.assert_allclose(u, -0.05 * want[2], atol=2e-5)
  assert np.abs(u / -0.05 - want[5]).max() > 0.1
  with pytest.raises(ValueError, match='optimizer.muon_ns_steps'):
    OptimizerConfig(name='muon', muon_ns_steps=0)


@pytest.mark.parametrize('scaling', ['schatten', 'aol'])
def test_muon_preconditioning_sets_the_first_scaling(scaling):
  """One iteration after each scaling matches its reference, and not the Frobenius one's."""
  rng = np.random.default_rng(3)
  grads = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                       is_leaf=lambda x: isinstance(x, tuple))
  cfg = dataclasses.replace(MUON, muon_ns_steps=1, muon_preconditioning=scaling)
  u = _first_updates(cfg, grads)['blocks']['mlp']['down']
  g = np.float64(grads['blocks']['mlp']['down'])
  want = {k: np.stack([_newton_schulz(m, 1, k) for m in g]) for k in (scaling, 'frobenius')}
  np.testing.assert_allclose(u, -0.05 * want[scaling], atol=2e-5)
  assert np.abs(u / -0.05 - want['frobenius']).max() > 0.1
  with pytest.raises(ValueError, match='optimizer.muon_preconditioning'):
    OptimizerConfig(name='muon', muon_preconditioning='newton')


def test_muon_leaves_embeddings_head_and_norms_to_adamw():
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                       is_leaf=lambda x: isinstance(x, tuple))
  muon = _first_updates(MUON, grads)
  adamw = _first_updates(dataclasses.replace(MUON, name='adamw'), grads)
  for path in (('embed',), ('head',), ('blocks', 'attn_norm', 'scale')):
    pick = lambda tree, path=path: functools.reduce(lambda t, k: t[k], path, tree)
    np.testing.assert_array_equal(pick(muon), pick(adamw))
  # The matrices are not AdamW's (whose first update is -lr * sign(g)).
  down = muon['blocks']['mlp']['down']
  assert not np.allclose(np.abs(down), 0.1, rtol=0.1)


def test_muon_needs_the_axis_names_and_a_positive_rate():
  with pytest.raises(ValueError, match='logical axis names'):
    make_optimizer(MUON, 10)
  with pytest.raises(ValueError, match='optimizer.muon_lr'):
    OptimizerConfig(name='muon', muon_lr=0.0)
  with pytest.raises(ValueError, match='optimizer.name'):
    OptimizerConfig(name='sgd')
