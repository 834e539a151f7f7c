"""Schedules, the weight-decay mask and clipping, against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.optimizer import OptimizerConfig, decay_mask, make_optimizer, schedule


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
