"""Hugging Face interop, checked against transformers' own LlamaForCausalLM and tokenizer."""

import dataclasses
import functools
import io
import json
import os

os.environ['HF_HUB_OFFLINE'] = '1'  # Everything here is local; never reach the Hub.

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from data import stdlib
from data.tokenizer import Tokenizer
from lm.export import hf, hf_export, hf_import, hf_tokenizer
from lm.model import flops
from lm.model.config import ModelConfig
from lm.model.transformer import Transformer
from tests.helpers import one_device_env, script

# Every test here runs torch and transformers: the slow tier.
pytestmark = pytest.mark.slow
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SMALL = {'vocab_size': 128, 'd_model': 64, 'num_layers': 2, 'num_heads': 4, 'num_kv_heads': 2,
         'd_ff': 96}
CONFIGS = {
    'gqa_untied': ModelConfig(**SMALL, tie_embeddings=False, rope_theta=500.0, norm_eps=1e-6),
    # head_dim * num_heads != d_model: the projections' reshapes must use head_dim.
    'tied_head_dim': ModelConfig(**SMALL, tie_embeddings=True, head_dim=24),
    'scan': ModelConfig(**SMALL, tie_embeddings=False, scan_layers=True),
    # Llama 3's RoPE scaling from 64 tokens: its three bands all hold frequencies.
    'llama3_rope': ModelConfig(**SMALL, tie_embeddings=False, rope_scaling=8.0,
                               rope_original_max_position=64),
}
# Mixtures of experts export as Qwen3-MoE: QK-norm, a dense first layer, 4 experts.
MOE = {'num_experts': 4, 'experts_per_token': 2, 'expert_d_ff': 48, 'first_dense_layers': 1,
       'aux_loss': 0.01}
MOE_CONFIGS = {
    'moe': ModelConfig(**{**SMALL, 'num_layers': 3}, qk_norm=True, tie_embeddings=False,
                       moe=MOE),
    'moe_tied_every_other': ModelConfig(**{**SMALL, 'num_layers': 4}, qk_norm=True,
                                        moe={**MOE, 'every': 2, 'experts_per_token': 1}),
}


@functools.cache
def _params(cfg: ModelConfig, seed: int = 0):
  """Random params (numpy, no compile) in which no two norms or heads are alike."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    z = rng.standard_normal(x.shape)
    if path[-1].key == 'scale':  # RMSNorm gains around 1.
      z = 1 + 0.2 * z
    elif path[-1].key != 'embed':
      z = z / np.sqrt(cfg.d_model)
    return z.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _apply(cfg: ModelConfig):
  return jax.jit(lambda params, ids: Transformer(cfg).apply({'params': params}, ids))


def _our_logits(cfg, params, ids):
  return np.asarray(_apply(cfg)(params, jnp.asarray(ids)))


def _hf_model(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
  return model.float().eval()


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('name', list(CONFIGS) + list(MOE_CONFIGS))
def test_transformers_reproduces_our_logits(tmp_path, name):
  cfg = {**CONFIGS, **MOE_CONFIGS}[name]
  params = _params(cfg)
  hf.write_model(str(tmp_path), params, cfg)
  model = _hf_model(str(tmp_path))
  moe = cfg.moe.enabled
  assert type(model).__name__ == ('Qwen3MoeForCausalLM' if moe else 'LlamaForCausalLM')
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 24))
  ours = _our_logits(cfg, params, ids)
  np.testing.assert_allclose(_hf_logits(model, ids), ours, atol=1e-4, rtol=0)
  assert np.abs(ours).max() > 0.5  # Not trivially small.
  # The file holds a head only when untied, and the config says which.
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['tie_word_embeddings'] == cfg.tie_embeddings
  assert ('lm_head.weight' in hf_import.read_safetensors(str(tmp_path))) != cfg.tie_embeddings


@pytest.mark.parametrize('name', ['gqa_untied', 'moe'])
def test_greedy_generation_matches_transformers(tmp_path, name):
  cfg = {**CONFIGS, **MOE_CONFIGS}[name]
  params = _params(cfg, seed=3)
  hf.write_model(str(tmp_path), params, cfg, eos_id=-1)  # No EOS: both run to the end.
  prompt, new = [5, 17, 42, 9, 77], 12
  # Recomputes the whole sequence each step, no cache to get wrong; a fixed-size buffer
  # compiles once, and causality makes the padding after the last token irrelevant.
  buf = np.zeros((1, len(prompt) + new), np.int32)
  buf[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + new):
    buf[0, t] = np.argmax(_our_logits(cfg, params, buf)[0, t - 1])
  ids = buf[0].tolist()
  with torch.no_grad():
    out = _hf_model(str(tmp_path)).generate(torch.tensor([prompt]), do_sample=False,
                                            max_new_tokens=12, pad_token_id=0)
  assert out[0].tolist() == ids
  assert len(set(ids[len(prompt):])) > 1  # A degenerate repeat would prove little.


@pytest.mark.parametrize('name', list(CONFIGS))
def test_round_trip_is_exact(tmp_path, name):
  cfg = CONFIGS[name]
  params = _params(cfg)
  _assert_trees_equal(hf.from_hf(hf.to_hf(params, cfg), cfg), params)
  hf.write_model(str(tmp_path), params, cfg)
  _assert_trees_equal(hf_import.load_hf(str(tmp_path), cfg), params)
  # hf_model_config recovers the architecture from config.json alone.
  arch = hf_import.hf_model_config(str(tmp_path))
  rebuilt = ModelConfig(**{**arch, 'scan_layers': cfg.scan_layers})
  assert rebuilt == cfg


@pytest.mark.parametrize('name', list(MOE_CONFIGS))
def test_moe_round_trip_is_exact_from_either_expert_layout(tmp_path, name):
  """Per-expert tensors are written; transformers 5 holds them fused (E, 2F, D) in
  memory, and from_hf reads that layout too."""
  cfg = MOE_CONFIGS[name]
  params = _params(cfg)
  written = hf.to_hf(params, cfg)
  assert 'model.layers.1.mlp.experts.3.gate_proj.weight' in written
  assert 'model.layers.0.mlp.gate_proj.weight' in written  # the dense first layer
  _assert_trees_equal(hf.from_hf(written, cfg), params)
  hf.write_model(str(tmp_path), params, cfg)
  fused = {k: v.numpy() for k, v in _hf_model(str(tmp_path)).state_dict().items()}
  assert 'model.layers.1.mlp.experts.gate_up_proj' in fused
  _assert_trees_equal(hf.from_hf(fused, cfg), params)
  arch = hf_import.hf_model_config(str(tmp_path))
  rebuilt = ModelConfig(**{**arch, 'moe': {**arch['moe'], 'aux_loss': cfg.moe.aux_loss}})
  assert rebuilt == cfg


@pytest.mark.parametrize('key,value', [('router', 'sigmoid'), ('num_shared_experts', 1),
                                       ('bias_rate', 0.001)])
def test_moe_settings_qwen3_cannot_express_are_refused_by_key(tmp_path, key, value):
  cfg = dataclasses.replace(MOE_CONFIGS['moe'], moe={**MOE, key: value})
  with pytest.raises(ValueError, match=rf'^model\.moe\.{key}={value!r}: .*Qwen3-MoE') as e:
    hf.write_model(str(tmp_path / 'out'), _params(cfg), cfg)
  assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()
  plain = dataclasses.replace(MOE_CONFIGS['moe'], qk_norm=False)
  with pytest.raises(ValueError, match=r'^model\.qk_norm=False: .*Qwen3-MoE'):
    hf.check_expressible(plain)


@pytest.mark.parametrize('key,value', [('qk_norm', True), ('mlp', 'relu2'),
                                       ('logit_softcap', 30.0), ('mup_base_width', 16)])
def test_switches_llama_cannot_express_are_refused_by_key(tmp_path, key, value):
  cfg = ModelConfig(**SMALL, **{key: value})
  params = _params(cfg)
  out = tmp_path / 'out'
  for action in (lambda: hf.write_model(str(out), params, cfg),  # export
                 lambda: hf.to_hf(params, cfg),  # the GGUF export's first step
                 lambda: hf.from_hf(hf.to_hf(_params(ModelConfig(**SMALL)), ModelConfig(**SMALL)),
                                    cfg)):  # import (init_from=hf:...)
    with pytest.raises(ValueError, match=rf'^model\.{key}={value!r}: .*Hugging Face Llama') as e:
      action()
    assert '\n' not in str(e.value)
  assert not out.exists()


def test_zero_init_out_is_only_an_initialisation_and_exports(tmp_path):
  cfg = ModelConfig(**SMALL, zero_init_out=True)
  params = _params(cfg)  # Trained-like weights: the export must carry them as they are.
  hf.write_model(str(tmp_path), params, cfg)
  _assert_trees_equal(hf_import.load_hf(str(tmp_path), cfg), params)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  np.testing.assert_allclose(_hf_logits(_hf_model(str(tmp_path)), ids),
                             _our_logits(cfg, params, ids), atol=1e-4, rtol=0)


def test_to_hf_layout():
  """q (D, N, H) -> (N·H, D): row n·H + h of q_proj is head n, dim h."""
  cfg = CONFIGS['gqa_untied']
  params = _params(cfg)
  sd = hf.to_hf(params, cfg)
  q = params['block_1']['attn']['q']
  np.testing.assert_array_equal(sd['model.layers.1.self_attn.q_proj.weight'][2 * 16 + 5],
                                q[:, 2, 5])
  np.testing.assert_array_equal(sd['model.layers.0.post_attention_layernorm.weight'],
                                params['block_0']['mlp_norm']['scale'])
  np.testing.assert_array_equal(sd['lm_head.weight'], params['head'].T)
  assert set(sd) == set(hf.expected_shapes(cfg))


def test_bfloat16_export_and_sharded_load(tmp_path):
  cfg = CONFIGS['scan']
  params = _params(cfg)
  hf.write_model(str(tmp_path), params, cfg, dtype='bfloat16')
  assert json.loads((tmp_path / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
  assert hf_import.read_safetensors(str(tmp_path))['model.norm.weight'].dtype.name == 'bfloat16'
  # Placed onto the shardings and dtypes of an existing (e.g. freshly initialised) tree.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  like = jax.tree.map(lambda x: jax.device_put(x, sharded if x.shape[0] % 8 == 0 else
                                               jax.sharding.NamedSharding(
                                                   mesh, jax.sharding.PartitionSpec())),
                      params)
  loaded = hf_import.load_hf(str(tmp_path), cfg, like=like)
  for x, ref, orig in zip(jax.tree.leaves(loaded), jax.tree.leaves(like),
                          jax.tree.leaves(params)):
    assert x.sharding == ref.sharding and x.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(x), orig, rtol=1e-2, atol=1e-2)


def test_sharded_safetensors_folder(tmp_path):
  from safetensors.numpy import save_file
  cfg = CONFIGS['gqa_untied']
  params = _params(cfg)
  sd = hf.to_hf(params, cfg)
  names = sorted(sd)
  weight_map = {}
  for i, part in enumerate((names[:10], names[10:])):
    fname = f'model-{i + 1:05d}-of-00002.safetensors'
    save_file({k: sd[k] for k in part}, str(tmp_path / fname), metadata={'format': 'pt'})
    weight_map.update({k: fname for k in part})
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  (tmp_path / 'config.json').write_text(json.dumps(hf.llama_config(cfg)))
  _assert_trees_equal(hf_import.load_hf(str(tmp_path), cfg), params)


@pytest.fixture()
def folder(tmp_path):
  cfg = CONFIGS['gqa_untied']
  hf.write_model(str(tmp_path), _params(cfg), cfg)
  return tmp_path


def _edit_config(folder, **changes):
  config = json.loads((folder / 'config.json').read_text())
  config.update(changes)
  (folder / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('changes, key', [
    ({'attention_bias': True}, 'attention_bias'),
    ({'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0}}, 'rope_parameters.*needs'),
    ({'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}}, 'rope_parameters'),
    ({'model_type': 'gpt2'}, 'model_type'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'hidden_size': None}, 'hidden_size'),
])
def test_unsupported_config_is_named(folder, changes, key):
  _edit_config(folder, **changes)
  with pytest.raises(ValueError, match=key):
    hf_import.load_hf(str(folder), CONFIGS['gqa_untied'])


def test_config_mismatch_names_the_model_key(folder):
  cfg = CONFIGS['gqa_untied']
  with pytest.raises(ValueError, match=r'model\.d_ff=128 .*model\.d_ff=96'):
    hf_import.load_hf(str(folder), dataclasses.replace(cfg, d_ff=128))
  with pytest.raises(ValueError, match=r'model\.tie_embeddings=True'):
    hf_import.load_hf(str(folder), dataclasses.replace(cfg, tie_embeddings=True))
  with pytest.raises(ValueError, match=r'model\.rope_theta=10000.0 .*500.0'):
    hf_import.load_hf(str(folder), dataclasses.replace(cfg, rope_theta=10000.0))


def test_bad_tensors_are_named():
  cfg = CONFIGS['gqa_untied']
  sd = hf.to_hf(_params(cfg), cfg)
  bad = dict(sd, **{'model.layers.1.mlp.up_proj.weight': np.zeros((96, 63), np.float32)})
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj\.weight has shape'):
    hf.from_hf(bad, cfg)
  missing = {k: v for k, v in sd.items() if k != 'model.layers.0.self_attn.k_proj.weight'}
  with pytest.raises(ValueError, match='missing tensor model.layers.0.self_attn.k_proj'):
    hf.from_hf(missing, cfg)
  with pytest.raises(ValueError, match='unexpected tensor model.layers.2'):
    hf.from_hf(dict(sd, **{'model.layers.2.mlp.up_proj.weight': sd['lm_head.weight']}), cfg)
  tied = ModelConfig(**SMALL, tie_embeddings=True)
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    hf.from_hf(sd, tied)


def test_missing_files_are_named(tmp_path, folder):
  with pytest.raises(ValueError, match='no such folder'):
    hf_import.read_safetensors(str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='config.json'):
    hf_import.load_hf(str(tmp_path / 'nope'), CONFIGS['gqa_untied'])
  (folder / 'model.safetensors').unlink()
  with pytest.raises(ValueError, match='model.safetensors'):
    hf_import.load_hf(str(folder), CONFIGS['gqa_untied'])


# --- scripts/export_hf.py on a real (two-step) run: conftest's trained_run ------------------


def _assert_same_encoding(model_path, out_dir, encode):
  hf_tokenizer.write(model_path, str(out_dir), max_length=64)
  theirs = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  texts = [stdlib.read(p) for p in stdlib.list_files()[300:330]]
  # Our Tokenizer sends a literal U+2581 to bytes; plain sentencepiece (and so HF) does not.
  texts = [t.replace('\u2581', '') for t in texts]
  texts += ['', ' ', ' lead', 'trail ', '  two\n\n\t\ttabs', 'caf\u00e9 \U0001f600 \u4e2d\u6587',
            '12345 + 0.5e-3', '\n    indented\n        more',
            'literal <s> and </s> and <unk> and <pad> in the text']
  for text in texts:
    # Special-token strings in text are characters to sentencepiece (the exported
    # tokenizer reads them as tokens by default, for chat templates).
    ids = theirs(text, add_special_tokens=False, split_special_tokens=True)['input_ids']
    assert ids == encode(text), text[:200]
    assert theirs.decode(ids) == text


def test_hf_tokenizer_encodes_like_ours(tokenizer, tmp_path):
  _assert_same_encoding(tokenizer, tmp_path, Tokenizer(tokenizer).encode)


def test_hf_tokenizer_with_a_dummy_prefix(tmp_path):
  """A Llama-2-style model: the dummy prefix, ids unk=0 bos=1 eos=2, no pad."""
  text = '\n'.join(stdlib.read(p) for p in stdlib.list_files()[:40])[:300_000]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines()), model_writer=model, model_type='bpe',
      vocab_size=400, byte_fallback=True, normalization_rule_name='identity',
      add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, minloglevel=2)
  path = tmp_path / 'dummy.model'
  path.write_bytes(model.getvalue())
  sp = spm.SentencePieceProcessor(model_file=str(path))
  _assert_same_encoding(str(path), tmp_path / 'hf', sp.encode)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
  assert theirs('x')['input_ids'] == [1] + sp.encode('x')
  assert theirs.pad_token is None


@pytest.mark.parametrize('change, message', [
    (lambda m: setattr(m.trainer_spec, 'model_type', m.trainer_spec.UNIGRAM), 'not BPE'),
    (lambda m: setattr(m.normalizer_spec, 'name', 'nmt_nfkc'), 'nmt_nfkc'),
    (lambda m: setattr(m.normalizer_spec, 'add_dummy_prefix', True), 'user-defined'),
])
def test_unconvertible_tokenizer_is_refused(tokenizer, tmp_path, change, message):
  proto = hf_tokenizer.load_proto(tokenizer)
  change(proto)
  path = tmp_path / 'changed.model'
  path.write_bytes(proto.SerializeToString())
  with pytest.raises(ValueError, match=f'{path}.*{message}'):
    hf_tokenizer.check_supported(str(path))


def _export(*args):
  return script('export_hf.py', *args, check=False, env=one_device_env())


def test_export_script_loads_in_transformers(trained_run, tmp_path):
  out = tmp_path / 'hf'
  proc = _export(f'--workdir={trained_run}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['out'] == str(out) and result['step'] == 2
  for name in ('config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.model',
               'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    assert (out / name).is_file(), name

  # The tokenizer encodes and decodes like ours, with BOS first as in training.
  ours = Tokenizer(str(trained_run / 'tokenizer.model'))
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  text = ('class Point:\n    """A 2-d point."""\n\n    def norm(self) -> float:\n'
          '        return (self.x ** 2 + self.y ** 2) ** 0.5  # héllo\t\u00e9 \U0001f600\n')
  assert theirs(text, add_special_tokens=False)['input_ids'] == ours.encode(text)
  ids = theirs(text)['input_ids']
  assert ids == [ours.bos_id] + ours.encode(text)
  assert theirs.decode(ids, skip_special_tokens=True) == text
  assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
  # The chat template fine-tuning uses (data/sft.py; tests/test_sft.py checks its ids).
  chat = [{'role': 'user', 'content': 'Q:'}, {'role': 'assistant', 'content': ' A'}]
  assert theirs.apply_chat_template(chat, tokenize=False) == '<s>Q: A</s>'

  # The model reproduces our logits from the checkpoint.
  cfgs, step, params = hf_export.restore_run(str(trained_run))
  assert step == 2 and result['params'] == flops.count_params(params)
  model = _hf_model(str(out))
  np.testing.assert_allclose(_hf_logits(model, [ids]), _our_logits(cfgs.model, params, [ids]),
                             atol=1e-4, rtol=0)
  assert hf_import.hf_model_config(str(out))['num_kv_heads'] == 2

  # A second export into the same folder is refused, and the folder left as it was.
  before = sorted(os.listdir(out))
  again = _export(f'--workdir={trained_run}', f'--out={out}')
  assert again.returncode == 1
  assert 'not empty' in again.stderr and str(out) in again.stderr
  assert sorted(os.listdir(out)) == before


def test_export_names_a_missing_step_and_writes_nothing(trained_run, tmp_path):
  with pytest.raises(ValueError, match=r'no checkpoint for step 7 in .* \(steps: 2\)'):
    hf_export.export(str(trained_run), str(tmp_path / 'x'), step=7)
  assert not (tmp_path / 'x').exists()
  with pytest.raises(ValueError, match='config.json'):
    hf_export.export(str(tmp_path), str(tmp_path / 'x'))


def test_an_export_onto_a_disk_that_refuses_it_is_one_line(trained_run, tmp_path, monkeypatch):
  # Root ignores permission bits: the refusal is what safetensors raises on a read-only
  # disk, in its own exception type, which the export turns into an OSError (one line).
  import safetensors
  import safetensors.numpy

  def refuse(tensors, path, metadata=None):
    raise safetensors.SafetensorError('Error while serializing: I/O error: Read-only file '
                                      'system (os error 30)')

  monkeypatch.setattr(safetensors.numpy, 'save_file', refuse)
  with pytest.raises(OSError, match=rf'^cannot write {tmp_path}/x/model.safetensors: .*'
                                    'Read-only file system'):
    hf_export.export(str(trained_run), str(tmp_path / 'x'))


def test_a_torn_safetensors_file_is_one_line_naming_it(tmp_path):
  from safetensors.numpy import save_file

  path = tmp_path / 'model.safetensors'
  save_file({'w': np.arange(64, dtype=np.float32)}, str(path))
  assert hf_import.read_safetensors(str(tmp_path))['w'].shape == (64,)  # whole, it reads
  path.write_bytes(path.read_bytes()[:100])  # as a copy cut short leaves it
  with pytest.raises(ValueError, match=rf'^cannot read {path}: \S'):
    hf_import.read_safetensors(str(tmp_path))
