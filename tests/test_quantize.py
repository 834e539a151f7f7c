"""Weight-only int8 / int4 quantisation (lm/eval/quantize.py) and its flags on eval.py,
generate.py and bench.py."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from data.batch import Batch
from lm.eval.quantize import QuantConfig, bytes_per_device, quantize_params, quantized_model
from lm.mesh import MeshConfig
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from lm.sharding import AxisRules
from tests.helpers import one_device_env, script

INT8 = QuantConfig('int8')
CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  d_ff=128)
# Each block matrix: (its axes contracted in the forward pass, its output axes).
CONTRACTED = {'q': (0,), 'k': (0,), 'v': (0,), 'o': (0, 1), 'gate': (0,), 'up': (0,),
              'down': (0,)}


@functools.cache  # Several tests read the same quantised model.
def _setup(mesh=(1, 1, 1), scan=False, quant=INT8, tied=True):
  cfg = ModelConfig(**{**CFG.__dict__, 'scan_layers': scan, 'tie_embeddings': tied})
  rules = AxisRules.from_config(MeshConfig(*mesh), jax.devices()[:int(np.prod(mesh))])
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 24)), jnp.int32)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(1), tokens)['params'])
  model = Transformer(cfg, rules)
  qmodel = quantized_model(model, quant)
  return model, qmodel, params, quantize_params(qmodel, params, rules, quant), tokens


def _block_weights(params, scan):
  """{(layer, name): weight} of every quantisable block matrix, per layer."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, w in flat.items():
    if path[-1] in CONTRACTED:
      if scan:
        for i in range(CFG.num_layers):
          out[(i, path[-1])] = w[i]
      else:
        out[(int(path[0].split('_')[1]), path[-1])] = w
  return out


def _as_float(qparams):
  """The quantised tree with each matrix dequantised: the weights it computes with."""
  def one(x):
    if hasattr(x, 'how'):  # A block matrix: qwix's WithAux around a QArray.
      return qwix.dequantize(x.array)
    return qwix.dequantize(x) if isinstance(x, qwix.QArray) else x

  return jax.tree.map(one, qparams, is_leaf=lambda x: hasattr(x, 'how') or
                      isinstance(x, qwix.QArray))


@pytest.mark.parametrize('scan', [False, True])
def test_int8_is_one_absmax_scale_per_output_channel_and_layer(scan):
  _, _, params, qparams, _ = _setup(scan=scan)
  floats = _block_weights(params, scan)
  quants = _block_weights(qparams, scan)
  assert len(floats) == 7 * CFG.num_layers
  for key, w in floats.items():
    q = quants[key].array
    w = np.asarray(w, np.float64)
    # Hand-derived: the largest magnitude over the contracted axes / 127.5, kept per
    # output channel; a scale shared over layers or heads would differ.
    want = np.abs(w).max(axis=CONTRACTED[key[1]], keepdims=True) / 127.5
    np.testing.assert_allclose(np.asarray(q.scale), want, rtol=1e-6, err_msg=str(key))
    values = np.asarray(q.qvalue)
    # Each value is w / scale rounded to nearest (ties at the top bucket's half step go
    # either way in float32 arithmetic).
    ratio = w / np.asarray(q.scale, np.float64)
    assert values.dtype == np.int8
    assert np.abs(values - ratio).max() <= 0.5 + 1e-4


def test_int4_scales_groups_along_the_contracted_axis():
  _, _, params, qparams, _ = _setup(quant=QuantConfig('int4', group=16))
  up = np.asarray(params['block_0']['mlp']['up'], np.float64)  # D x F, D contracted.
  q = qparams['block_0']['mlp']['up'].array
  groups = np.abs(up).reshape(CFG.d_model // 16, 16, CFG.d_ff).max(axis=1)
  np.testing.assert_allclose(np.asarray(q.scale), groups / 7.5, rtol=1e-6)
  assert q.qvalue.dtype == jnp.int4
  err = np.abs(np.asarray(qwix.dequantize(q), np.float64) - up)
  assert (err <= np.repeat(np.asarray(q.scale), 16, axis=0) / 2 + 1e-7).all()


@pytest.mark.parametrize('mesh,scan', [((2, 2, 2), False), ((1, 8, 1), True)])
def test_quantized_model_computes_with_the_dequantized_weights(mesh, scan):
  model, qmodel, params, qparams, tokens = _setup(mesh, scan)
  logits = jax.jit(qmodel.apply)({'params': qparams}, tokens)
  reference = jax.jit(model.apply)({'params': _as_float(qparams)}, tokens)
  np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)
  # Control: the weights really are rounded, so the float model's logits differ.
  full = jax.jit(model.apply)({'params': params}, tokens)
  assert float(jnp.abs(logits - full).max()) > 1e-3
  # The quantised values stay sharded as their float weights were.
  q = qparams['blocks' if scan else 'block_0']['mlp']['up'].array.qvalue
  assert q.sharding.spec == model_shardings(model, params, scan)


def model_shardings(model, params, scan):
  from lm.model.params import abstract_params
  abstract = abstract_params(model, model.rules)
  return abstract['blocks' if scan else 'block_0']['mlp']['up'].sharding.spec


def test_embedding_head_and_norms_are_kept_as_trained():
  _, _, params, qparams, _ = _setup()
  for path in (('embed',), ('head',), ('final_norm', 'scale'), ('block_1', 'mlp_norm', 'scale')):
    if path == ('head',) and CFG.tie_embeddings:
      continue
    got, want = qparams, params
    for p in path:
      got, want = got[p], want[p]
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize('tied,mesh,mode', [(True, (2, 2, 2), 'int8'), (False, (1, 8, 1), 'int4')])
def test_embedding_and_head_quantized_per_vocabulary_entry(tied, mesh, mode):
  quant = QuantConfig(mode, group=16, embeddings=True)
  model, qmodel, params, qparams, tokens = _setup(mesh, quant=quant, tied=tied)
  for name, vocab_axis in (('embed', 0),) + ((('head', 1),) if not tied else ()):
    q, w = qparams[name], np.asarray(params[name], np.float64)
    assert isinstance(q, qwix.QArray)
    if mode == 'int8':  # One scale per vocabulary entry: its largest magnitude / 127.5.
      want = np.abs(w).max(axis=1 - vocab_axis, keepdims=True) / 127.5
      np.testing.assert_allclose(np.asarray(q.scale), want, rtol=1e-6)
  logits = jax.jit(qmodel.apply)({'params': qparams}, tokens)
  reference = jax.jit(model.apply)({'params': _as_float(qparams)}, tokens)
  np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)
  # The chunked loss reads the head through lm.model.transformer.output_head: the same NLL.
  from lm.eval.perplexity import make_eval_step
  shape = (tokens.shape[0], tokens.shape[1])
  mask = jnp.ones((shape[0], shape[1] - 1), jnp.int32)
  shardings = jax.tree.map(lambda x: x.sharding, qparams)
  sums = [make_eval_step(qmodel, model.rules, shape, shardings, np.ones(128, np.int32),
                         loss_chunk=chunk)(qparams, Batch(tokens), mask)[0]
          for chunk in (0, 8)]
  np.testing.assert_allclose(sums[0], sums[1], rtol=1e-5)


def test_bytes_per_device_counts_shards_and_half_bytes():
  rules = AxisRules.from_config(MeshConfig(1, 8, 1), jax.devices())
  x = jax.device_put(jnp.zeros((16, 4), jnp.int4), rules.sharding(('embed', None), (16, 4)))
  y = jax.device_put(jnp.zeros((3,), jnp.float32), rules.replicated())
  assert bytes_per_device({'x': x, 'y': y}) == 16 * 4 // 8 // 2 + 12


def test_group_that_does_not_divide_is_refused():
  with pytest.raises(ValueError, match=r'--quantize_group=48 does not divide model.d_model'):
    QuantConfig('int4', group=48).check_shapes(Transformer(CFG))
  with pytest.raises(ValueError, match=r'--quantize: expected one of'):
    QuantConfig('int3').validate()


def _expected_int8_bytes(workdir):
  """(Float bytes of the kept parameters + one byte per block weight + a float32 scale
  per output channel, all float bytes): from the checkpoint's float parameters."""
  from lm.export.hf_export import restore_run

  _, _, params = restore_run(str(workdir))
  total = floats = 0
  for path, w in flax.traverse_util.flatten_dict(params).items():
    floats += w.size * w.dtype.itemsize
    if path[-1] in CONTRACTED:
      keep = [d for i, d in enumerate(w.shape) if i not in CONTRACTED[path[-1]]]
      total += w.size + 4 * int(np.prod(keep))
    else:
      total += w.size * w.dtype.itemsize
  return total, floats


@pytest.mark.slow
def test_eval_and_generate_report_quantized_weights(trained_run, tmp_path):
  from lm.eval.score_run import evaluate_run

  text = tmp_path / 'text.txt'
  text.write_text('def add(a, b):\n    return a + b\n' * 40)
  results = {mode: evaluate_run(str(trained_run), files=str(text), quant=QuantConfig(mode))
             for mode in ('none', 'int8', 'int4')}
  assert 'quantize' not in results['none']  # The plain JSON keeps its keys.
  assert results['int8']['quantize'] == 'int8' and results['int4']['quantize'] == 'int4'
  int8_bytes, float_bytes = _expected_int8_bytes(trained_run)
  assert results['int8']['param_bytes_per_device'] == int8_bytes
  assert results['int4']['param_bytes_per_device'] < int8_bytes < float_bytes / 2
  assert results['int8']['loss'] != results['none']['loss']
  # Sampling reads the same quantised weights through its own (decoding) model.
  from lm.eval.quantize import load_quantized_run, weights_record
  from lm.eval.sampling import SamplingConfig, complete

  run = load_quantized_run(str(trained_run), quant=INT8)
  out = complete(run, 'def ', SamplingConfig(max_new_tokens=8, temperature=0.0), timed=True)
  assert len(out['ids']) == 8 and out['tokens_per_sec'] > 0
  assert weights_record(run) == {'quantize': 'int8', 'param_bytes_per_device': int8_bytes}


@pytest.mark.slow
def test_bad_quantize_flags_are_one_line(trained_run):
  env = one_device_env()
  proc = script('eval.py', f'--workdir={trained_run}', '--quantize=int4',
                '--quantize_group=48', env=env, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      'error: --quantize_group=48 does not divide model.d_model (128); pick a divisor of '
      'd_model']
  proc = script('generate.py', f'--workdir={trained_run}', '--quantize_embeddings', env=env,
                check=False)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
      'error: --quantize_embeddings goes with --quantize=int8 or int4']
  proc = script('bench.py', '--config=configs/tiny.py', '--quantize=int8', env=env, check=False)
  assert proc.returncode == 1 and '--inference and --quantize go with --aot' in proc.stderr


@pytest.mark.slow
def test_aot_plan_matches_the_quantized_weights(tmp_path):
  """bench.py --aot --quantize plans from shapes the bytes the real quantisation holds."""
  from configs import tiny
  from lm.config import parse
  from lm.experiments.bench import plan_inference

  config = tiny.get_config()
  config.model.d_model, config.model.d_ff, config.model.vocab_size = 64, 128, 128
  config.mesh.fsdp, config.mesh.data, config.seq_len = 8, 1, 16
  plan = plan_inference(config, QuantConfig('int8'))
  cfgs = parse(config)
  rules = AxisRules.from_config(cfgs.mesh)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(Transformer(cfgs.model).init(jax.random.PRNGKey(0), tokens)['params'])
  qmodel = quantized_model(Transformer(cfgs.model, rules), QuantConfig('int8'))
  qparams = quantize_params(qmodel, params, rules, QuantConfig('int8'))
  assert plan['param_bytes_per_device'] == bytes_per_device(qparams)
  assert plan['memory_bytes_per_device'] >= plan['param_bytes_per_device']
