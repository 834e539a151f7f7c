"""The benchmark's figures agree with the compiler and respond to the mesh as they should."""

import json
import sys
import time

import pytest

from configs import tiny
from lm.config import parse
from lm.experiments import bench
from lm.model import flops
from tests import helpers


def _small(**mesh):
  c = tiny.get_config()
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.d_ff = 256
  c.model.vocab_size = 1024
  c.seq_len = 64
  # AdamW: the checks below count the model's FLOPs and two moments per parameter; Muon's
  # orthogonalisation is FLOPs of its own, outside the PaLM formula. Output projections
  # start random, so that attention (and the packing mask) reaches the first loss.
  c.optimizer.name = 'adamw'
  c.model.zero_init_out = False
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_palm_flops_match_the_compilers_count():
  config = _small(data=8)
  result = bench.run_steps(config, steps=2, warmup=1)
  cfgs = parse(config)
  tokens = cfgs.run.batch_size * cfgs.run.seq_len
  # XLA counts every multiply-add of the step, elementwise work included, per device.
  ratio = result['xla_flops_per_device'] * result['devices'] / (
      flops.flops_per_token(cfgs.model, cfgs.run.seq_len) * tokens)
  assert 0.9 < ratio < 1.3, ratio
  assert result['tokens_per_sec'] > 0 and result['step_ms'] > 0
  assert result['mfu'] is None  # CPU: no known peak


def test_aot_memory_shrinks_with_fsdp():
  replicated = bench.run_aot(_small(data=8))
  sharded = bench.run_aot(_small(data=1, fsdp=8))
  assert replicated['tokens_per_sec'] is None
  params = flops.num_params(parse(_small()).model)
  # Replicated: every device holds params + two Adam moments (float32) at least.
  assert replicated['memory_bytes_per_device'] > 3 * 4 * params
  # FSDP splits the state (params and Adam moments) 8 ways.
  ratio = sharded['state_bytes_per_device'] / replicated['state_bytes_per_device']
  assert ratio == pytest.approx(1 / 8, rel=0.05)
  assert sharded['memory_bytes_per_device'] < replicated['memory_bytes_per_device']


@pytest.mark.slow
def test_bench_script_prints_the_spec_keys():
  cmd = [sys.executable, 'scripts/bench.py', '--config=configs/tiny.py', '--aot',
         '--config.model.num_layers=1']
  proc = helpers.run(cmd, timeout=300)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {'config', 'devices', 'tokens_per_sec', 'step_ms', 'mfu', 'tflops_per_sec',
          'compile_s', 'memory_bytes_per_device', 'data_tokens_per_sec'} <= set(result)
  assert result['devices'] == 8 and result['memory_bytes_per_device'] > 0


def test_data_throughput_times_the_tokenising(tmp_path, tokenizer, monkeypatch):
  # Encoding made to cost 20 us a token (at most 50k tokens/s): a figure far above that
  # was served from documents tokenised before the clock started.
  from data.tokenizer import Tokenizer
  real = Tokenizer.encode_batch

  def slow(self, texts, num_threads=None):
    out = real(self, texts, num_threads)
    time.sleep(20e-6 * sum(len(ids) for ids in out))
    return out

  monkeypatch.setattr(Tokenizer, 'encode_batch', slow)
  words = 'alpha beta gamma delta epsilon zeta eta theta'.split()
  with open(tmp_path / 'x.jsonl', 'w') as f:
    for i in range(400):
      f.write(json.dumps({'text': ' '.join(words[(i + j) % 8] for j in range(10 + i % 30))}))
      f.write('\n')
  c = tiny.get_config()
  c.batch_size, c.seq_len = 2, 16
  c.data.source, c.data.files, c.data.tokenizer = 'files', str(tmp_path / 'x.jsonl'), tokenizer
  out = bench.data_throughput(c, batches=5, seconds=0.5)
  assert out['data_seconds'] >= 0.5 and out['data_batches'] >= 5
  assert 0 < out['data_tokens_per_sec'] < 1.5 * 50_000, out


@pytest.mark.parametrize('kind,peak', [('NVIDIA H100 80GB HBM3', 989e12),
                                       ('NVIDIA H100 PCIe', 756e12),
                                       ('NVIDIA A100-SXM4-80GB', 312e12),
                                       ('TPU v5 lite', 197e12), ('cpu', None)])
def test_peak_table(kind, peak):
  class Dev:
    device_kind = kind
  assert flops.device_peak_flops(Dev()) == peak


@pytest.mark.slow
def test_vary_measures_each_lever_alone_from_the_config():
  cmd = [sys.executable, 'scripts/bench.py', '--config=configs/tiny.py', '--aot',
         '--config.model.num_layers=1', '--vary=loss.chunk=0,16',
         '--vary=model.tie_embeddings=False']
  proc = helpers.run(cmd, timeout=300)
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert [r['variant'] for r in lines] == [
      'base', 'loss.chunk=0', 'loss.chunk=16', 'model.tie_embeddings=False']
  # Each variant really ran its own config: an untied head adds V x D parameters.
  cfg = tiny.get_config()
  assert lines[3]['params'] - lines[0]['params'] == cfg.model.vocab_size * cfg.model.d_model
  assert lines[1]['params'] == lines[2]['params'] == lines[0]['params']


@pytest.mark.parametrize('vary,message', [('model.nope=1', 'no config key model.nope'),
                                          ('loss.chunk=abc', 'cannot set'),
                                          ('junk', 'expected KEY=V1,V2'),
                                          ('model.mlp=relu2;seed=1,2', 'one value per key'),
                                          ('model.mlp=relu2;junk', 'expected KEY=V1,V2')])
def test_bad_vary_is_one_clear_error(vary, message):
  with pytest.raises(ValueError, match=message):
    bench.variants(tiny.get_config(), [vary])


def test_a_combined_variant_sets_its_keys_together():
  got = bench.variants(tiny.get_config(),
                       ['model.mlp=relu2;optimizer.muon_ns_steps=2', 'model.mlp=relu2'])
  assert [name for name, _ in got] == [
      'base', 'model.mlp=relu2;optimizer.muon_ns_steps=2', 'model.mlp=relu2']
  both, alone = got[1][1], got[2][1]
  assert (both.model.mlp, both.optimizer.muon_ns_steps) == ('relu2', 2)
  assert (alone.model.mlp, alone.optimizer.muon_ns_steps) == ('relu2', 5)


@pytest.mark.slow
def test_packed_documents_are_benchmarked_with_their_mask():
  plain = _small(data=8)
  packed = _small(data=8)
  packed.data.segment_ids = True
  a = bench.run_steps(plain, steps=1, warmup=1)
  b = bench.run_steps(packed, steps=1, warmup=1)
  # The same tokens, masked by document: a different loss, so the mask was in the step.
  assert a['loss'] != b['loss']
  assert bench.run_aot(packed)['memory_bytes_per_device'] > 0


def test_checkpoint_timing_saves_restores_and_sizes_the_state():
  config = _small(fsdp=8, data=1)
  result = bench.checkpoint_timing(config, repeats=1)
  state = [v for k, v in result.items() if k.endswith('_s')]
  assert all(t > 0 for t in state), result
  # Parameters plus Adam's two moments, float32, a few scalars besides.
  n = flops.num_params(parse(config).model)
  assert 3 * 4 * n <= result['state_bytes'] < 3 * 4 * n + 1024, (result['state_bytes'], n)
