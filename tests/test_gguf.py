"""GGUF export (lm/export/gguf_export.py): the file read back with gguf's own reader, and run by
llama.cpp itself (llama-cpp-python) where it is installed (marker `llama_cpp`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from data import stdlib
from data.tokenizer import Tokenizer
from lm.eval import sampling
from lm.export import gguf_export, hf_export
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from tests.helpers import one_device_env, script

gguf = pytest.importorskip('gguf')


@pytest.fixture(scope='module')
def checkpoint(trained_run):
  """(configs, step, params as numpy) of the shared tiny run's latest checkpoint."""
  return hf_export.restore_run(str(trained_run))


@pytest.fixture(scope='module')
def files(trained_run, tmp_path_factory):
  """{'f16': path, 'q8_0': path}: f16 through the script (its pulse), q8_0 in-process."""
  out = tmp_path_factory.mktemp('gguf')
  f16, q8 = str(out / 'run-f16.gguf'), str(out / 'run-q8_0.gguf')
  proc = script('export_gguf.py', f'--workdir={trained_run}', f'--out={f16}',
                env=one_device_env())
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['out'] == f16 and result['type'] == 'f16' and result['tensors'] == 21
  assert result['bytes'] == os.path.getsize(f16)
  gguf_export.export_gguf(str(trained_run), q8, qtype='q8_0')
  return {'f16': f16, 'q8_0': q8}


def _field(reader, key):
  field = reader.get_field(key)
  assert field is not None, key
  return field.contents()


def _tensors(path):
  """{name: (float32 array in numpy's (rows, cols) order, GGMLQuantizationType)}."""
  reader = gguf.GGUFReader(path)
  return {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape(
      tuple(int(d) for d in reversed(t.shape))), t.tensor_type) for t in reader.tensors}


def _expected(params, cfg: ModelConfig):
  """What each GGUF tensor should hold, derived here from our own layout (not lm/export/hf.py).

  A matrix is (out, in); q and k rows of head n are H long, and llama.cpp's row 2i of a
  head is our dimension i, row 2i + 1 our dimension i + H/2 (adjacent-pair RoPE).
  """
  H = cfg.head_size

  def interleave(w_DxNxH):
    halves = w_DxNxH[..., :H // 2], w_DxNxH[..., H // 2:]
    w_DxNxHalfx2 = np.stack(halves, axis=-1)
    return w_DxNxHalfx2.reshape(w_DxNxH.shape[0], -1).T

  out = {'token_embd.weight': params['embed'], 'output_norm.weight': params['final_norm']['scale']}
  if not cfg.tie_embeddings:
    out['output.weight'] = params['head'].T
  for i in range(cfg.num_layers):
    b, p = params[f'block_{i}'], f'blk.{i}.'
    out.update({
        p + 'attn_norm.weight': b['attn_norm']['scale'],
        p + 'attn_q.weight': interleave(b['attn']['q']),
        p + 'attn_k.weight': interleave(b['attn']['k']),
        p + 'attn_v.weight': b['attn']['v'].reshape(cfg.d_model, -1).T,
        p + 'attn_output.weight': b['attn']['o'].reshape(-1, cfg.d_model).T,
        p + 'ffn_norm.weight': b['mlp_norm']['scale'],
        p + 'ffn_gate.weight': b['mlp']['gate'].T,
        p + 'ffn_up.weight': b['mlp']['up'].T,
        p + 'ffn_down.weight': b['mlp']['down'].T,
    })
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.mark.slow
def test_metadata(files, checkpoint, trained_run):
  cfgs, _, _ = checkpoint
  c = cfgs.model
  reader = gguf.GGUFReader(files['f16'])
  assert _field(reader, 'general.architecture') == 'llama'
  want = {'llama.context_length': cfgs.run.seq_len, 'llama.embedding_length': c.d_model,
          'llama.block_count': c.num_layers, 'llama.feed_forward_length': c.d_ff,
          'llama.attention.head_count': c.num_heads,
          'llama.attention.head_count_kv': c.num_kv_heads,
          'llama.vocab_size': c.vocab_size, 'llama.rope.dimension_count': c.head_size,
          'general.file_type': int(gguf.LlamaFileType.MOSTLY_F16)}
  for key, value in want.items():
    assert _field(reader, key) == value, key
  assert _field(reader, 'llama.rope.freq_base') == pytest.approx(c.rope_theta)
  assert _field(reader, 'llama.attention.layer_norm_rms_epsilon') == pytest.approx(c.norm_eps)
  assert reader.get_field('llama.attention.key_length') is None  # H * N == D here.
  q8 = gguf.GGUFReader(files['q8_0'])
  assert _field(q8, 'general.file_type') == int(gguf.LlamaFileType.MOSTLY_Q8_0)


@pytest.mark.slow
def test_vocabulary(files, trained_run):
  sp = spm.SentencePieceProcessor(model_file=str(trained_run / 'tokenizer.model'))
  reader = gguf.GGUFReader(files['f16'])
  assert _field(reader, 'tokenizer.ggml.model') == 'llama'
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  scores = _field(reader, 'tokenizer.ggml.scores')
  types = _field(reader, 'tokenizer.ggml.token_type')
  n = sp.vocab_size()
  assert len(tokens) == len(scores) == len(types) == n  # model.vocab_size == the tokenizer's.
  assert tokens == [sp.id_to_piece(i) for i in range(n)]
  np.testing.assert_allclose(scores, [sp.get_score(i) for i in range(n)])
  T = gguf.TokenType
  for i in range(n):
    kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
            else T.BYTE if sp.is_byte(i) else None)
    if kind is not None:
      assert types[i] == kind, (i, tokens[i])
  # Newline and tab are matched before merging, in sentencepiece and llama.cpp alike; the
  # four-space piece never is in sentencepiece (spaces are U+2581 by then), so it is normal.
  assert types[tokens.index('\n')] == types[tokens.index('\t')] == T.USER_DEFINED
  assert types[tokens.index('    ')] == T.NORMAL
  assert sum(t == T.BYTE for t in types) == 256
  for key, value in (('bos_token_id', sp.bos_id()), ('eos_token_id', sp.eos_id()),
                     ('unknown_token_id', sp.unk_id()), ('padding_token_id', sp.pad_id()),
                     ('add_bos_token', True), ('add_eos_token', False),
                     ('add_space_prefix', False)):
    assert _field(reader, f'tokenizer.ggml.{key}') == value, key


@pytest.mark.slow
def test_vocab_pads_to_model_size(trained_run):
  tokens, scores, types = gguf_export.vocab(str(trained_run / 'tokenizer.model'), 515)
  assert tokens[512:] == [b'[PAD512]', b'[PAD513]', b'[PAD514]']
  assert types[512:] == [gguf.TokenType.UNUSED] * 3 and len(scores) == 515


@pytest.mark.slow
def test_f16_tensors_are_the_checkpoint(files, checkpoint):
  cfgs, _, params = checkpoint
  want, got = _expected(params, cfgs.model), _tensors(files['f16'])
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    y, kind = got[name]
    assert y.shape == x.shape, name
    if x.ndim == 1:
      assert kind == gguf.GGMLQuantizationType.F32, name
      np.testing.assert_array_equal(y, x, err_msg=name)
    else:
      assert kind == gguf.GGMLQuantizationType.F16, name
      np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32), err_msg=name)


@pytest.mark.slow
def test_q8_0_tensors_within_a_block_step(files, checkpoint):
  cfgs, _, params = checkpoint
  want, got = _expected(params, cfgs.model), _tensors(files['q8_0'])
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    y, kind = got[name]
    if x.ndim == 1:
      assert kind == gguf.GGMLQuantizationType.F32
      np.testing.assert_array_equal(y, x, err_msg=name)
      continue
    assert kind == gguf.GGMLQuantizationType.Q8_0, name
    # q8_0: blocks of 32 along a row, each an int8 times one scale d = max|x| / 127:
    # rounding costs d / 2, and storing d in float16 up to 127 * d * 2^-11 more.
    blocks_x, blocks_y = x.reshape(-1, 32), y.reshape(-1, 32)
    d = np.abs(blocks_x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(blocks_y - blocks_x) <= d * (0.5 + 127 * 2.0**-11) + 1e-7), name
    assert not np.array_equal(y, x)


def test_q8_0_falls_back_to_f16_for_rows_off_the_block_size():
  x = np.ones((4, 48), np.float32)
  _, kind = gguf_export.encode_tensor('blk.0.ffn_up.weight', x, 'q8_0')
  assert kind == gguf.GGMLQuantizationType.F16
  _, kind = gguf_export.encode_tensor('blk.0.ffn_up.weight', np.ones((4, 64)), 'q8_0')
  assert kind == gguf.GGMLQuantizationType.Q8_0


def _rope(x_TxNxH, theta, adjacent):
  """RoPE as llama.cpp's llama applies it (adjacent pairs) or as Hugging Face does."""
  t, _, h = x_TxNxH.shape
  angle_Txh = np.arange(t)[:, None] * theta ** (-np.arange(0, h, 2) / h)
  cos, sin = np.cos(angle_Txh)[:, None], np.sin(angle_Txh)[:, None]
  if adjacent:
    a, b = x_TxNxH[..., 0::2], x_TxNxH[..., 1::2]
    return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x_TxNxH.shape)
  a, b = x_TxNxH[..., :h // 2], x_TxNxH[..., h // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _reference_logits(tensors, cfg: ModelConfig, ids, adjacent=True):
  """llama.cpp's llama graph in numpy, on the tensors of a GGUF file: (T, V) logits."""
  w = {k: v.astype(np.float64) for k, (v, _) in tensors.items()}
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  norm = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * g
  x = w['token_embd.weight'][ids]
  t = len(ids)
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    p = f'blk.{i}.'
    h = norm(x, w[p + 'attn_norm.weight'])
    q = _rope((h @ w[p + 'attn_q.weight'].T).reshape(t, N, H), cfg.rope_theta, adjacent)
    k = _rope((h @ w[p + 'attn_k.weight'].T).reshape(t, K, H), cfg.rope_theta, adjacent)
    v = (h @ w[p + 'attn_v.weight'].T).reshape(t, K, H)
    k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # Head n reads n // G.
    s = np.where(causal[None], np.einsum('tnh,snh->nts', q, k) / np.sqrt(H), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum('nts,snh->tnh', a, v).reshape(t, N * H) @ w[p + 'attn_output.weight'].T
    h = norm(x, w[p + 'ffn_norm.weight'])
    gate, up = h @ w[p + 'ffn_gate.weight'].T, h @ w[p + 'ffn_up.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + 'ffn_down.weight'].T
  head = w.get('output.weight', w['token_embd.weight'])
  return norm(x, w['output_norm.weight']) @ head.T


def _prompt(trained_run, n):
  tok = Tokenizer(str(trained_run / 'tokenizer.model'))
  text = stdlib.read(stdlib.list_files()[0])
  return [tok.bos_id] + tok.encode(text)[:n - 1]


def _our_logits(cfg, params, ids):
  return np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray([ids]))[0],
                    np.float64)


@pytest.mark.slow
def test_llama_graph_on_the_file_gives_our_logits(files, checkpoint, trained_run):
  """llama.cpp's conventions (adjacent-pair RoPE on the file's q and k) reproduce our
  model with the same float16-rounded weights; the same graph with Hugging Face's RoPE
  on those tensors does not (the control: the permutation matters for this model)."""
  cfgs, _, params = checkpoint
  ids = _prompt(trained_run, 48)
  rounded = jax.tree.map(
      lambda x: x.astype(np.float16).astype(np.float32) if x.ndim > 1 else x, params)
  ours = _our_logits(cfgs.model, rounded, ids)
  tensors = _tensors(files['f16'])
  err = np.abs(_reference_logits(tensors, cfgs.model, ids) - ours).max()
  wrong = np.abs(_reference_logits(tensors, cfgs.model, ids, adjacent=False) - ours).max()
  assert err < 1e-4, err
  assert wrong > 1e-2, wrong


# Tied embeddings, head_dim * num_heads != d_model and scanned layers, on random weights.
TIED = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=24, d_ff=96, tie_embeddings=True, scan_layers=True,
                   rope_theta=500.0, norm_eps=1e-6)


@pytest.fixture(scope='module')
def tied_file(trained_run, tmp_path_factory):
  """(path, params): TIED with random weights, written with the shared run's tokenizer."""
  import flax.linen as nn

  params = jax.device_get(nn.meta.unbox(Transformer(TIED).init(
      jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))['params']))
  path = str(tmp_path_factory.mktemp('tied') / 'tied.gguf')
  gguf_export.write(path, gguf_export.gguf_tensors(params, TIED),
                    TIED, str(trained_run / 'tokenizer.model'), context_length=64)
  return path, params


@pytest.mark.slow
def test_tied_head_dim_and_scanned_layers(tied_file, trained_run):
  path, params = tied_file
  reader = gguf.GGUFReader(path)
  assert _field(reader, 'llama.attention.key_length') == 24
  assert _field(reader, 'llama.attention.value_length') == 24
  assert _field(reader, 'llama.rope.dimension_count') == 24
  tensors = _tensors(path)
  assert 'output.weight' not in tensors  # llama.cpp reuses token_embd.
  assert tensors['blk.1.attn_q.weight'][0].shape == (4 * 24, 64)
  ids = _prompt(trained_run, 32)
  rounded = jax.tree.map(
      lambda x: x.astype(np.float16).astype(np.float32) if x.ndim > 1 else x, params)
  ours = _our_logits(TIED, rounded, ids)
  assert np.abs(_reference_logits(tensors, TIED, ids) - ours).max() < 1e-4


@pytest.mark.parametrize('key,value', [('qk_norm', True), ('mlp', 'relu2'),
                                       ('logit_softcap', 30.0), ('mup_base_width', 16)])
def test_refuses_what_llama_cannot_express(key, value):
  gguf_export.check_expressible(ModelConfig())  # At its defaults, the model is a Llama.
  with pytest.raises(ValueError, match=rf'^model\.{key}={value!r}: .*llama') as e:
    gguf_export.check_expressible(ModelConfig(**{key: value}))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r'^model\.moe\.num_experts=8: .*llama.* has no experts'):
    gguf_export.check_expressible(ModelConfig(moe={'num_experts': 8}))
  # Training, compute and initialisation switches change nothing the file must say.
  gguf_export.check_expressible(ModelConfig(remat=True, scan_layers=True, dropout=0.1,
                                            param_dtype='bfloat16', zero_init_out=True))


def test_refuses_a_tokenizer_llama_cpp_would_split_differently(tokenizer, tmp_path):
  from lm.export import hf_tokenizer

  proto = hf_tokenizer.load_proto(tokenizer)
  proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM  # llama.cpp merges by score.
  path = tmp_path / 'unigram.model'
  path.write_bytes(proto.SerializeToString())
  with pytest.raises(ValueError, match=f'{path}: cannot convert to GGUF: model_type is not BPE'):
    hf_tokenizer.check_supported(str(path), target='GGUF')


@pytest.mark.slow
def test_script_refuses_an_existing_file_and_a_bad_run(trained_run, tmp_path):
  out = tmp_path / 'x.gguf'
  out.write_bytes(b'keep')
  proc = script('export_gguf.py', f'--workdir={trained_run}', f'--out={out}', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'error: output file {out} exists; refusing to overwrite it']
  assert out.read_bytes() == b'keep'
  proc = script('export_gguf.py', f'--workdir={tmp_path / "none"}',
                f'--out={tmp_path / "y.gguf"}', check=False)
  assert proc.returncode == 1 and 'no run folder' in proc.stderr
  assert os.listdir(tmp_path) == ['x.gguf']  # Nothing half-written left behind.


# llama.cpp itself. llama-cpp-python builds llama.cpp from source when installed.


def _llama(path, n_ctx, monkeypatch):
  """llama.cpp's model of the file, weights in plain CPU buffers.

  Without its extra buffer types: on CPUs with AMX, llama.cpp 0.3.36's AMX buffers crash
  on any q8_0 model, llama.cpp's own quantisation of our f16 file included.
  `llama_cpp.Llama` offers no switch for them, so the default model params gain one.
  """
  llama_cpp = pytest.importorskip('llama_cpp')
  lib = llama_cpp.llama_cpp
  defaults = lib.llama_model_default_params

  def params():
    p = defaults()
    p.use_extra_bufts = False
    return p

  monkeypatch.setattr(lib, 'llama_model_default_params', params)
  return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, logits_all=True, n_threads=2,
                         n_batch=n_ctx, verbose=False)


def _llama_logits(llm, ids):
  llm.reset()
  llm.eval(ids)
  return np.asarray(llm.scores[:len(ids)], np.float64)


def _nll(logits_TxV, ids):
  """Mean negative log-likelihood (nats) of ids[1:] under logits of ids[:-1]."""
  z = logits_TxV[:-1] - logits_TxV[:-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_greedy_equals_ours_f16(files, checkpoint, trained_run, monkeypatch):
  cfgs, _, params = checkpoint
  prompt, new = _prompt(trained_run, 16), 40
  llm = _llama(files['f16'], cfgs.run.seq_len, monkeypatch)
  assert llm.n_vocab() == cfgs.model.vocab_size
  # Its logits over the prompt first: the sharper check, whatever greedy picks.
  tol = 1e-2  # float16 weights (and llama.cpp's float16 activations in its matmuls).
  err = np.abs(_llama_logits(llm, prompt) - _our_logits(cfgs.model, params, prompt)).max()
  assert err < tol, err
  theirs = list(prompt)
  llm.reset()
  llm.eval(theirs)
  for _ in range(new):
    theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval(theirs[-1:])
  cfg = sampling.SamplingConfig(max_new_tokens=new, temperature=0.0)
  ours = sampling.generate(sampling.sampling_model(cfgs.model), params, [prompt], cfg)[0]
  assert len(set(ours)) > 1  # Not one token repeated: the context matters.
  # A two-step model's top two logits can be closer than float16's error (down to 1e-4
  # on this run): there, and only there, the two may part ways.
  logits = _our_logits(cfgs.model, params, prompt + ours)[len(prompt) - 1:-1]
  top2 = np.sort(logits, axis=-1)[:, -2:]
  for i, (a, b) in enumerate(zip(theirs[len(prompt):], ours)):
    if a != b:
      margin = top2[i, 1] - top2[i, 0]
      assert margin < 2 * tol, f'new token {i}: llama.cpp {a}, ours {b}, margin {margin}'
      break


def _windows(tok, n, count):
  """`count` rows of BOS + n - 1 tokens of the stdlib's first files."""
  ids = []
  for path in stdlib.list_files():
    ids += tok.encode(stdlib.read(path))
    if len(ids) >= count * (n - 1):
      break
  return [[tok.bos_id] + ids[i * (n - 1):(i + 1) * (n - 1)] for i in range(count)]


def _bits_per_byte(logits_fn, windows, byte_lengths):
  nats = sum(_nll(logits_fn(w), w) * (len(w) - 1) for w in windows)
  return nats / np.log(2) / sum(int(byte_lengths[w[1:]].sum()) for w in windows)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_q8_0_bits_per_byte_within_one_percent(files, checkpoint, trained_run,
                                                        monkeypatch):
  cfgs, _, params = checkpoint
  tok = Tokenizer(str(trained_run / 'tokenizer.model'))
  n = cfgs.run.seq_len
  windows = _windows(tok, n, 8)
  llm = _llama(files['q8_0'], n, monkeypatch)
  err = np.abs(_llama_logits(llm, windows[0])
               - _our_logits(cfgs.model, params, windows[0])).max()
  assert err < 0.25, err  # 0.09 here; the file without the q/k permutation is 3 off.
  ours = _bits_per_byte(lambda w: _our_logits(cfgs.model, params, w), windows,
                        tok.byte_lengths())
  theirs = _bits_per_byte(lambda w: _llama_logits(llm, w), windows, tok.byte_lengths())
  assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_tied_head_dim_logits(tied_file, trained_run, monkeypatch):
  path, params = tied_file
  ids = _prompt(trained_run, 32)
  err = np.abs(_llama_logits(_llama(path, 64, monkeypatch), ids)
               - _our_logits(TIED, params, ids)).max()
  assert err < 1e-2, err


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_tokenizes_like_sentencepiece(files, trained_run, monkeypatch):
  tok = Tokenizer(str(trained_run / 'tokenizer.model'))
  llm = _llama(files['f16'], 64, monkeypatch)
  text = stdlib.read(stdlib.list_files()[2])[:2000]
  assert llm.tokenize(text.encode(), add_bos=True) == [tok.bos_id] + tok.encode(text)
