"""Meshes: the same training steps on any layout, and parameters sharded as the rules say."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonState

from configs import base
from data.batch import Batch
from lm.mesh import MeshConfig
from lm.model.config import ModelConfig
from lm.model.params import param_axes
from lm.model.transformer import Transformer
from lm.optim.config import OptimizerConfig
from lm.optim.optimizer import make_optimizer, schedule
from lm.sharding import AxisRules
from lm.train.step import init_state, jit_train_step, make_train_step

RULES = MeshConfig.from_dict(base.get_config().mesh).rules
MODEL = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4,
                    d_ff=128)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule='constant')
BATCH, SEQ = 8, 32


def _rules(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return AxisRules.from_config(MeshConfig(*shape, rules=RULES), devices)


def _train(shape, steps=3, model=MODEL, opt=OPT, segments=False, loss_chunk=0):
  rules = _rules(shape)
  net = Transformer(model, rules)
  tx = make_optimizer(opt, 100, param_axes(net))
  state, shardings = init_state(net, tx, SEQ, rules, seed=0)
  step = jit_train_step(make_train_step(net, tx, schedule(opt, 100), grad_accum=opt.grad_accum,
                                        z_loss=opt.z_loss, loss_chunk=loss_chunk,
                                        rules=rules),
                        shardings, rules, (BATCH, SEQ + 1))
  rng = np.random.default_rng(0)
  data = rng.integers(0, model.vocab_size, (steps, BATCH, SEQ + 1)).astype(np.int32)
  # Documents of random lengths, about 7 tokens on average.
  segment_ids = 1 + np.cumsum(rng.random(data.shape) < 0.15, axis=-1, dtype=np.int32)
  losses = []
  for tokens, ids in zip(data, segment_ids):
    state, metrics = step(state, Batch(tokens, segment_ids=ids if segments else None))
    losses.append(float(metrics['loss']))
  return losses, state


@pytest.fixture(scope='module')
def reference():
  return _train((1, 1, 1))


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_same_losses_on_every_mesh(reference, shape):
  losses, _ = _train(shape)
  np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
  assert losses[0] != losses[-1]  # the steps really updated the model


def test_parameters_are_sharded_as_the_rules_say():
  _, state = _train((2, 2, 2), steps=1)
  p = state.params
  assert p['embed'].sharding.spec == P('tensor', 'fsdp')
  assert p['block_0']['attn']['q'].sharding.spec == P('fsdp', 'tensor', None)
  assert p['block_0']['mlp']['down'].sharding.spec == P('tensor', 'fsdp')
  assert p['block_0']['attn_norm']['scale'].sharding.spec == P('fsdp')
  # Each device really holds only its shard: (vocab/2, d/2).
  assert p['embed'].addressable_shards[0].data.shape == (128, 32)
  # Adam's moments follow their parameters.
  mu = state.opt_state[1][0].mu
  assert mu['embed'].sharding.spec == P('tensor', 'fsdp')


def test_a_dimension_the_mesh_does_not_divide_is_replicated():
  rules = _rules((1, 1, 8))
  # 4 kv heads cannot be split 8 ways: replicated over tensor rather than an error.
  assert rules.spec(('embed', 'kv_heads', 'head_dim'), (64, 4, 8)) == P(None, None, None)
  assert rules.spec(('embed', 'heads', 'head_dim'), (64, 8, 8)) == P(None, 'tensor', None)
  rules = _rules((2, 2, 2))
  assert rules.spec(('batch', 'length'), (8, 33)) == P(('data', 'fsdp'), None)
  assert rules.spec(('batch', 'length'), (2, 33)) == P('data', None)


def test_grad_accumulation_matches_the_full_batch():
  full, _ = _train((2, 2, 2))
  accum, _ = _train((2, 2, 2), opt=dataclasses.replace(OPT, grad_accum=2))
  np.testing.assert_allclose(accum, full, rtol=1e-5)


def test_chunked_loss_trains_as_the_plain_loss_on_a_mesh(reference):
  chunked, _ = _train((2, 2, 2), loss_chunk=8)
  np.testing.assert_allclose(chunked, reference[0], rtol=1e-5)


@pytest.mark.slow
def test_packed_documents_train_alike_on_every_layout_and_with_accumulation():
  one = _train((1, 1, 1), segments=True)[0]
  accum = dataclasses.replace(OPT, grad_accum=2)
  np.testing.assert_allclose(_train((2, 2, 2), opt=accum, segments=True)[0], one, rtol=1e-5)
  np.testing.assert_allclose(_train((1, 8, 1), loss_chunk=8, segments=True)[0], one,
                             rtol=1e-5)
  # The segment ids change the model's view: not the losses of unmasked rows.
  assert abs(one[0] - _train((1, 1, 1), steps=1)[0][0]) > 1e-4


MUON = dataclasses.replace(OPT, name='muon', muon_lr=0.05)
SCANNED = dataclasses.replace(MODEL, scan_layers=True)


@pytest.fixture(scope='module')
def muon_reference():
  return {scan: _train((1, 1, 1), model=SCANNED if scan else MODEL, opt=MUON)[0]
          for scan in (False, True)}


@pytest.mark.slow
@pytest.mark.parametrize('shape,scan', [((2, 2, 2), True), ((1, 8, 1), True),
                                        ((1, 1, 8), True), ((2, 2, 2), False)])
def test_muon_trains_alike_on_every_mesh(muon_reference, shape, scan):
  """Newton-Schulz on FSDP- and tensor-sharded matrices, stacked layers or not."""
  losses, state = _train(shape, model=SCANNED if scan else MODEL, opt=MUON)
  np.testing.assert_allclose(losses, muon_reference[scan], rtol=1e-5)
  assert losses[0] != losses[-1]
  # Muon's momentum is sharded as its parameter is, never gathered whole.
  (muon,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
      x, MuonState)) if isinstance(s, MuonState)]
  layer = 'blocks' if scan else 'block_0'
  for name in ('q', 'o'):
    assert muon.mu[layer]['attn'][name].sharding == state.params[layer]['attn'][name].sharding


@pytest.mark.parametrize('sizes,message', [
    ((3, 1, 1), 'data\\*fsdp\\*tensor\\*expert\\*context = 3'),
    ((-1, -1, 1), r'^mesh.fsdp: only one axis may be -1, and mesh.data is \(got -1\)$'),
    ((-1, 3, 1), 'cannot be split'),
    ((0, 1, 1), r'^mesh.data: must be positive or -1 \(got 0\)$'),
])
def test_bad_mesh_names_the_problem(sizes, message):
  with pytest.raises(ValueError, match=message):
    MeshConfig(*sizes).shape(8)


def test_minus_one_takes_the_remaining_devices():
  # (data, fsdp, tensor, expert, context), as lm.mesh.MESH_AXES orders them.
  assert MeshConfig(-1, 2, 1).shape(8) == (4, 2, 1, 1, 1)
  assert MeshConfig(2, 1, -1).shape(8) == (2, 1, 4, 1, 1)
  assert MeshConfig(2, 1, 1, -1).shape(8) == (2, 1, 1, 1, 4)
  assert MeshConfig(2, 1, 1, 1, -1).shape(8) == (2, 1, 1, 4, 1)
