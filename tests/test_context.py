"""The context axis: ring and all-gather attention against full attention on one device,
the balancing orders, and whole train steps on meshes that split the sequence."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.mesh import MeshConfig
from lm.model import context
from lm.sharding import AxisRules

B, T, N, K, H = 2, 32, 8, 2, 8


def _context_rules(n):
  return AxisRules.from_config(MeshConfig(data=8 // n, context=n))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, h, H)).astype(np.float32) for h in (N, K, K))
  # Documents of about 5 tokens: boundaries inside chunks and on their edges.
  seg = (1 + np.cumsum(rng.random((B, T)) < 0.2, axis=1)).astype(np.int32)
  seg[1] = 1  # One row a single document: causality alone.
  return q, k, v, seg


def _full(q, k, v, seg):
  causal = np.tril(np.ones((T, T), bool))
  mask = causal[None] & (seg[:, :, None] == seg[:, None, :])
  return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[:, None],
                                      scale=H ** -0.5)


def _on_context(mode, rules, order, q, k, v, seg, key_tile=context.KEY_TILE):
  """Context attention on rows permuted into `order`, the result put back in row order."""
  perm = context.sequence_order(T, rules.mesh.shape['context'], order)
  out = context.context_attention(q[:, perm], k[:, perm], v[:, perm], jnp.asarray(perm),
                                  seg[:, perm], scale=H ** -0.5, mode=mode, rules=rules,
                                  key_tile=key_tile)
  return out[:, np.argsort(perm)]


@pytest.mark.parametrize('n', [2, 4, 8])
@pytest.mark.parametrize('order', context.ORDERS)
@pytest.mark.parametrize('mode', context.MODES)
def test_context_attention_and_its_gradients_equal_full_attention(mode, order, n):
  _assert_equals_full_attention(mode, order, n)


@pytest.mark.parametrize('n,key_tile', [(2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize('order', context.ORDERS)
def test_the_ring_in_key_tiles_equals_full_attention(order, n, key_tile):
  """Half-chunks of 8 or 4 keys scored 2 or 4 at a time; tiles past every query skipped."""
  _assert_equals_full_attention('ring', order, n, key_tile)


def _assert_equals_full_attention(mode, order, n, key_tile=context.KEY_TILE):
  q, k, v, seg = _inputs()
  w = np.random.default_rng(1).standard_normal((B, T, N, H)).astype(np.float32)
  rules = _context_rules(n)
  ring = lambda q, k, v: _on_context(mode, rules, order, q, k, v, seg, key_tile)  # noqa: E731
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)  # noqa: E731
  full = jax.jit(jax.value_and_grad(loss(lambda q, k, v: _full(q, k, v, seg)), (0, 1, 2)))
  ours = jax.jit(jax.value_and_grad(loss(ring), (0, 1, 2)))
  np.testing.assert_allclose(jax.jit(lambda: ring(q, k, v))(), _full(q, k, v, seg),
                             atol=1e-5, rtol=1e-5)
  (want, want_grads), (got, got_grads) = full(q, k, v), ours(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w_, atol=1e-5, rtol=1e-5)


def test_the_segments_matter_across_devices():
  """Control: without the segment ids the ring's output changes (keys of an earlier
  document on another device would leak in), so the equality above is not by chance."""
  q, k, v, seg = _inputs()
  rules = _context_rules(4)
  ones = np.ones_like(seg)
  with_seg = jax.jit(lambda: _on_context('ring', rules, 'zigzag', q, k, v, seg))()
  without = jax.jit(lambda: _on_context('ring', rules, 'zigzag', q, k, v, ones))()
  assert np.abs(np.asarray(with_seg - without))[0].max() > 1e-2


def test_zigzag_balances_the_causal_work():
  # Half-chunk score blocks per device in one pass, 4 devices (16 blocks each at most).
  assert context.block_work(64, 4, 'contiguous') == [3, 7, 11, 15]
  assert context.block_work(64, 4, 'zigzag') == [9, 9, 9, 9]
  order = context.sequence_order(16, 4, 'zigzag')
  assert order.reshape(4, 2, 2)[:, :, 0].tolist() == [[0, 14], [2, 12], [4, 10], [6, 8]]
  assert sorted(order) == list(range(16))


# Whole train steps: the same losses and gradients as one device.

from data.batch import Batch  # noqa: E402
from lm.model.forward import model_loss  # noqa: E402
from lm.model.transformer import Transformer  # noqa: E402
from lm.optim.optimizer import make_optimizer  # noqa: E402
from lm.train.step import init_state  # noqa: E402
from tests.test_sharding import BATCH, MODEL, OPT, SEQ, _rules, _train  # noqa: E402


def _gradients(shape, model=MODEL):
  """The loss and its gradients at init on one packed batch, on the `shape` mesh."""
  rules = _rules(shape)
  net = Transformer(model, rules)
  state, _ = init_state(net, make_optimizer(OPT, 10), SEQ, rules, seed=0)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, model.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  segments = (1 + np.cumsum(rng.random(tokens.shape) < 0.15, axis=1)).astype(np.int32)
  grad = jax.jit(jax.value_and_grad(lambda p, b: model_loss(net, p, b)[0]))
  return jax.device_get(grad(state.params, Batch(tokens, segment_ids=segments)))


@pytest.fixture(scope='module')
def one_device():
  return {'losses': {s: _train((1, 1, 1), segments=s)[0] for s in (False, True)},
          'gradients': _gradients((1, 1, 1))}


def _assert_same_gradients(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# (data, fsdp, tensor, context)
@pytest.mark.parametrize('shape,segments', [((1, 1, 1, 4), True), ((2, 1, 1, 4), False),
                                            ((1, 2, 2, 2), True)])
def test_train_steps_split_on_context_equal_one_device(one_device, shape, segments):
  np.testing.assert_allclose(_train(shape, segments=segments)[0],
                             one_device['losses'][segments], rtol=1e-5)
  _assert_same_gradients(_gradients(shape), one_device['gradients'])


@pytest.mark.slow
@pytest.mark.parametrize('attention,order', [('allgather', 'zigzag'), ('ring', 'contiguous')])
def test_the_other_attention_and_order_train_alike(one_device, attention, order):
  model = dataclasses.replace(MODEL, context_attention=attention, context_order=order)
  np.testing.assert_allclose(_train((1, 1, 1, 8), model=model, segments=True)[0],
                             one_device['losses'][True], rtol=1e-5)
  _assert_same_gradients(_gradients((1, 1, 1, 8), model), one_device['gradients'])


@pytest.mark.parametrize('key,value,message', [
    ('seq_len', '36', r'^seq_len: must be divisible by 2 x mesh.context=4, .* \(got 36\)$'),
    ('model.attention', "'cudnn'", r"^model.attention: .* mesh.context=4 .* \(got 'cudnn'\)$"),
])
def test_a_config_the_context_axis_cannot_run_is_one_line(key, value, message):
  from configs import tiny
  from lm.config import parse, set_key

  config = tiny.get_config()
  set_key(config, 'mesh.context', '4')
  set_key(config, key, value)
  with pytest.raises(ValueError, match=message):
    parse(config)


def test_a_context_axis_that_does_not_divide_the_devices_is_named():
  with pytest.raises(ValueError, match=r'mesh.context=3'):
    MeshConfig(data=-1, context=3).shape(8)
  with pytest.raises(ValueError, match=r'^mesh.context: must be positive or -1 \(got 0\)$'):
    MeshConfig(context=0)


@pytest.mark.slow
def test_a_run_split_on_context_moves_to_other_layouts_and_samples_alike(tmp_path, tokenizer):
  """Trained at data=2 x context=4: its checkpoint restores bit for bit at data=8 and
  at context=8, greedy sampling gives the same ids on each, and it resumes at data=8."""
  from configs import tiny
  from lm.config import parse, set_key
  from lm.eval.sampling import SamplingConfig, generate, sampling_model
  from lm.model.params import abstract_params
  from lm.run.folder import RunFolder
  from lm.train import trainer
  from tests.helpers import read_metrics

  config = tiny.get_config()
  for key, value in {'workdir': str(tmp_path / 'run'), 'data.tokenizer': tokenizer,
                     'steps': 2, 'checkpoint_every': 2, 'seq_len': 32, 'eval_every': 2,
                     'eval_batches': 1, 'data.eval_fraction': 0.05, 'model.vocab_size': 512,
                     'model.num_layers': 2, 'model.d_model': 64, 'model.d_ff': 128,
                     'mesh.context': 4}.items():
    set_key(config, key, repr(value))
  trainer.train(config, handle_signals=False)
  cfgs = parse(config)
  leaves, samples = [], []
  for data, ctx in ((2, 4), (8, 1), (1, 8)):
    rules = AxisRules.from_config(dataclasses.replace(cfgs.mesh, data=data, context=ctx))
    params = RunFolder(str(tmp_path / 'run')).restore_params(
        2, abstract_params(Transformer(cfgs.model, rules), rules))
    leaves.append([np.asarray(x) for x in jax.tree.leaves(params)])
    samples.append(generate(sampling_model(cfgs.model, rules), params, [[2, 40, 41, 42]],
                            SamplingConfig(max_new_tokens=8, temperature=0)))
  for other in leaves[1:]:
    for a, b in zip(leaves[0], other):
      np.testing.assert_array_equal(a, b)
  assert samples[0] == samples[1] == samples[2] and len(samples[0][0]) == 8
  set_key(config, 'mesh.context', '1')
  set_key(config, 'steps', '3')
  trainer.train(config, handle_signals=False)  # Resumes from step 2 at data=8.
  assert [m['step'] for m in read_metrics(tmp_path / 'run') if 'loss' in m] == [2, 3]


def test_a_run_trained_on_a_context_axis_exports_as_any_other():
  from lm.export import gguf_export, hf

  cfg = dataclasses.replace(MODEL, context_attention='allgather', context_order='contiguous')
  hf.check_expressible(cfg)  # Raises for a key the format cannot express.
  gguf_export.check_expressible(cfg)
  with pytest.raises(ValueError, match='model.qk_norm'):  # Control: the check does check.
    hf.check_expressible(dataclasses.replace(cfg, qk_norm=True))


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
  from lm.model.config import ModelConfig
  from lm.model.positions import rope_frequencies

  cfg = ModelConfig(vocab_size=128, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96,
                    rope_scaling=8.0, rope_original_max_position=64)  # head size 16
  plain = 10000.0 ** (-np.arange(0, 16, 2) / 16)
  wavelength = 2 * np.pi / plain
  got = np.asarray(rope_frequencies(cfg))
  np.testing.assert_allclose(np.asarray(rope_frequencies(dataclasses.replace(
      cfg, rope_scaling=0.0))), plain, rtol=1e-6)
  # Wavelengths under 64 / 4 kept, over 64 / 1 divided by 8, blended between.
  blend = np.clip((64 / wavelength - 1) / 3, 0, 1)
  np.testing.assert_allclose(got, (1 - blend) * plain / 8 + blend * plain, rtol=1e-6)
  assert (wavelength < 16).any() and (wavelength > 64).any()
  assert ((wavelength > 16) & (wavelength < 64)).any()
  assert got[0] == pytest.approx(plain[0]) and got[-1] == pytest.approx(plain[-1] / 8)


def test_a_fine_tune_may_change_how_positions_are_read_and_a_resume_may_not():
  from lm.run import meta

  saved = {'model': {'rope_scaling': 0.0, 'rope_theta': 10000.0, 'd_model': 64}}
  now = {'model': {'rope_scaling': 8.0, 'rope_theta': 500000.0, 'd_model': 64}}
  assert meta.incompatibilities(saved, now, meta.POSITION_MODEL_KEYS) == []
  assert meta.incompatibilities(saved, now) == [
      'model.rope_scaling: 0.0 in checkpoint, 8.0 now',
      'model.rope_theta: 10000.0 in checkpoint, 500000.0 now']
  wider = {'model': {**now['model'], 'd_model': 128}}
  assert meta.incompatibilities(saved, wider, meta.POSITION_MODEL_KEYS) == [
      'model.d_model: 64 in checkpoint, 128 now']


@pytest.mark.slow
def test_scanned_remat_qk_norm_and_softcap_models_split_alike():
  model = dataclasses.replace(MODEL, scan_layers=True, remat=True, qk_norm=True,
                              logit_softcap=5.0)
  _assert_same_gradients(_gradients((2, 1, 1, 4), model), _gradients((1, 1, 1), model))


def test_positions_past_the_trained_rows_are_said():
  from lm.eval.sampling import past_training

  assert past_training(MODEL, 128, 128) == ''
  assert past_training(MODEL, 128, 2502) == (
      'positions up to 2502 go past the 128 tokens a row the model trained on (seq_len); '
      'RoPE extrapolates them')
  scaled = dataclasses.replace(MODEL, rope_scaling=4.0, rope_original_max_position=128)
  assert past_training(scaled, 512, 600).endswith(
      'past the 512 its RoPE scaling reaches (rope_original_max_position x rope_scaling)')
  assert 'scaling' not in past_training(scaled, 256, 400)


@pytest.mark.parametrize('n', [2, 4, 8])
def test_rows_move_into_the_balancing_order_and_back(n):
  rules = _context_rules(n)
  x = np.arange(2 * T * 3).reshape(2, T, 3)
  perm = context.sequence_order(T, n, 'zigzag')
  rows, (moved,) = context.Rows.split('zigzag', rules, None, jnp.asarray(x))
  np.testing.assert_array_equal(moved, x[:, perm])
  np.testing.assert_array_equal(rows.index_T, perm)
  np.testing.assert_array_equal(context.restore(moved, 'zigzag', rules), x)


def test_no_activation_is_gathered_into_whole_rows():
  """On data=2 x context=4 the step gathers weights and moves key/value blocks, but no
  all-gather's result is a row's full length: activations stay split (the MLP once
  folded B x T into one axis, which cannot be split on both, and gathered every row)."""
  rules = _rules((2, 1, 1, 4))
  net = Transformer(MODEL, rules)
  state, _ = init_state(net, make_optimizer(OPT, 10), SEQ, rules, seed=0)
  tokens = np.zeros((BATCH, SEQ + 1), np.int32)
  grad = jax.jit(jax.grad(lambda p, b: model_loss(net, p, b)[0]))
  hlo = grad.lower(state.params, Batch(tokens)).compile().as_text()
  gathers = [line for line in hlo.splitlines() if ' all-gather(' in line]
  assert gathers  # The weights' (FSDP over context): the check sees all-gathers.
  whole = [g for g in gathers if re.search(rf'[\[,]{SEQ}[\],]', g.split('all-gather(')[0])]
  assert not whole, whole[:3]
