"""KV-cache decoding and sampling, checked against recomputing the whole sequence."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from lm.eval import sampling
from lm.eval.sampling import SamplingConfig
from lm.mesh import MeshConfig
from lm.model.config import ModelConfig
from lm.model.params import stack_layers
from lm.model.transformer import Transformer
from lm.sharding import AxisRules, tree_shardings
from tests.helpers import cached_decode

# The project's default logical-axis rules, as every config has them.
RULES = MeshConfig.from_dict(base.get_config().mesh).rules

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=64, tie_embeddings=False)
SCANNED = dataclasses.replace(CFG, scan_layers=True)
PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 21], [2, 31, 32, 33]]


@functools.cache
def _params():
  """Random weights drawn with numpy (compiling the model's initialiser takes ~10 s).

  Unit-variance embeddings and 1/sqrt(fan-in) matrices give logits of order 1, so
  greedy choices are not near-ties.
  """
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(Transformer(CFG).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4), jnp.int32))
  shapes = nn.meta.unbox(shapes)['params']

  def draw(path, x):
    if path[-1].key == 'scale':  # RMSNorm
      return jnp.ones(x.shape, x.dtype)
    std = 1.0 if path[-1].key == 'embed' else 1 / np.sqrt(np.prod(x.shape[:-1]))
    return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, tokens_BxT):
  return Transformer(cfg).apply({'params': params}, tokens_BxT).astype(jnp.float32)


def _full_logits_of(rows, width=16):
  """Logits of each whole row (right-padded: causal, so padding changes nothing before it).

  One fixed width, so this compiles once.
  """
  tokens = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return np.asarray(_full_logits(CFG, _params(), jnp.asarray(tokens)))


def _generate(cfg, seed=0):
  return sampling.generate(sampling.sampling_model(CFG), _params(), PROMPTS, cfg, seed)


@pytest.mark.parametrize('model_cfg', [CFG, SCANNED], ids=['plain', 'scanned'])
def test_cached_decoding_matches_recomputing_the_whole_sequence(model_cfg):
  params = _params()
  if model_cfg.scan_layers:
    params = stack_layers(params, CFG.num_layers)
  more = np.array([[40, 41, 42], [43, 44, 45], [46, 47, 48]], np.int32)  # fed one by one
  prefill, decoded, p = cached_decode(Transformer(model_cfg), params, PROMPTS, more)
  want = _full_logits_of([prompt + row.tolist() for prompt, row in zip(PROMPTS, more)])
  for r, prompt in enumerate(PROMPTS):
    n = len(prompt)
    np.testing.assert_allclose(prefill[r, p - n:], want[r, :n], rtol=1e-5, atol=1e-5)
    for i, logits in enumerate(decoded):
      np.testing.assert_allclose(logits[r], want[r, n + i], rtol=1e-5, atol=1e-5)
  # The cache really carries the context: without the prompt the logits differ.
  assert np.abs(np.asarray(decoded[0][0]) - _full_logits_of([[40]] * 3)[0, 0]).max() > 1e-3


def test_greedy_is_deterministic_and_the_argmax_of_full_recompute():
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
  ids = _generate(cfg)
  assert ids == _generate(cfg, seed=123)  # The seed plays no part in greedy decoding.
  assert [len(x) for x in ids] == [8, 8, 8]
  full = _full_logits_of([p + x for p, x in zip(PROMPTS, ids)])
  for r, (prompt, new) in enumerate(zip(PROMPTS, ids)):
    for i, token in enumerate(new):
      assert token == int(np.argmax(full[r, len(prompt) + i - 1])), (r, i)


def test_the_same_seed_gives_the_same_sample_and_another_seed_another():
  cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
  a, b, c = _generate(cfg, seed=1), _generate(cfg, seed=1), _generate(cfg, seed=2)
  assert a == b
  assert a != c
  assert a != _generate(dataclasses.replace(cfg, temperature=0.0))


def test_top_k_never_emits_a_token_outside_the_k_best():
  k = 3
  ids = _generate(SamplingConfig(max_new_tokens=8, temperature=2.0, top_k=k), seed=5)
  assert _outside_top_k(ids, k) == 0
  # The check has teeth: unfiltered, temperature 2 over 64 tokens often leaves the top 3.
  assert _outside_top_k(_generate(SamplingConfig(max_new_tokens=8, temperature=2.0), 5), k)


def _outside_top_k(ids, k):
  """How many generated tokens are not among the k best of the recomputed logits."""
  full = _full_logits_of([p + x for p, x in zip(PROMPTS, ids)])
  count = 0
  for r, (prompt, new) in enumerate(zip(PROMPTS, ids)):
    for i, token in enumerate(new):
      logits = full[r, len(prompt) + i - 1]
      count += logits[token] < np.sort(logits)[-k] - 1e-4  # slack for float ties
  return count


def test_tiny_top_p_is_greedy():
  greedy = _generate(SamplingConfig(max_new_tokens=8, temperature=0.0))
  assert _generate(SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6), seed=9) == greedy


def test_filters_on_hand_made_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))

  filter_logits = jax.jit(sampling.filter_logits, static_argnames=('top_k', 'vocab_limit'))

  def kept(**kw):
    return np.asarray(filter_logits(logits, 1.0, **kw))[0] > -1e30
  assert kept(top_p=0.7).tolist() == [True, True, False, False]
  assert kept(top_p=0.8).tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
  assert kept(top_p=0.81).tolist() == [True, True, True, False]
  assert kept(top_k=1).tolist() == [True, False, False, False]
  assert kept(top_k=3, top_p=0.6).tolist() == [True, True, False, False]
  assert kept(vocab_limit=2).tolist() == [True, True, False, False]
  # Temperature 2 halves the logits: the probabilities flatten to sqrt(p) / sum sqrt(p).
  probs = jax.nn.softmax(filter_logits(logits, 2.0))
  want = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(probs[0], want / want.sum(), rtol=1e-5)


def test_eos_stops_its_row_and_max_new_tokens_is_respected():
  greedy = _generate(SamplingConfig(max_new_tokens=8, temperature=0.0))
  assert all(len(x) == 8 for x in greedy)
  # A token that row 0 emits (first at step k > 0) and row 1 never does.
  k, eos = next((i, t) for i, t in enumerate(greedy[0])
                if i and t not in greedy[0][:i] and t not in greedy[1])
  got = _generate(SamplingConfig(max_new_tokens=8, temperature=0.0, eos_id=eos))
  for row, full in zip(got, greedy):
    want = full[:full.index(eos) + 1] if eos in full else full
    assert row == want
  assert got[0] == greedy[0][:k + 1] and got[0][-1] == eos
  assert got[1] == greedy[1]  # The other row runs on to max_new_tokens.


@pytest.mark.slow
@pytest.mark.parametrize('shape', [(1, 1, 2), (2, 2, 2)])
def test_sharded_sampling_matches_one_device(shape):
  # Parameters split over fsdp and tensor (heads, kv heads, MLP, vocab): the same greedy
  # tokens and the same seeded samples as on one device.
  rules = AxisRules.from_config(MeshConfig(*shape, rules=RULES), jax.devices()[:np.prod(shape)])
  shardings = tree_shardings(
      jax.eval_shape(Transformer(CFG, rules).init, jax.random.PRNGKey(0),
                     jnp.zeros((1, 4), jnp.int32))['params'], rules)
  params = jax.device_put(_params(), shardings)
  assert params['block_0']['attn']['q'].sharding.spec[1] == 'tensor'
  model = sampling.sampling_model(CFG, rules)
  for cfg in (SamplingConfig(max_new_tokens=6, temperature=0.0),
              SamplingConfig(max_new_tokens=6, temperature=1.0)):
    assert (sampling.generate(model, params, PROMPTS, cfg, seed=3)
            == sampling.generate(sampling.sampling_model(CFG), _params(), PROMPTS, cfg,
                                 seed=3))


def test_bad_sampling_settings_name_the_setting():
  for kw, name in (({'max_new_tokens': 0}, 'max_new_tokens'), ({'temperature': -1.0},
                   'temperature'), ({'top_p': 0.0}, 'top_p'), ({'top_k': -2}, 'top_k')):
    with pytest.raises(ValueError, match=name):
      SamplingConfig(**kw).validate()
  with pytest.raises(ValueError, match='prompt'):
    sampling.left_pad([[1, 2], []])
