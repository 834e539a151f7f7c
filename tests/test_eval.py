"""Evaluation, scripts/eval.py, scripts/generate.py and scripts/plot.py.

The script tests share one tiny run trained here for 2 steps.
"""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from data.batch import Batch
from data.tokenizer import Tokenizer
from lm.config import parse
from lm.eval import score_run
from lm.eval.perplexity import make_eval_step
from lm.model.params import abstract_params
from lm.model.transformer import Transformer
from lm.run.folder import Run, load_run
from lm.sharding import AxisRules
from lm.train import trainer
from tests.helpers import script

DOCS = ['def f(x):\n    return x + 1\n', 'import os\nprint(os.getcwd())  # où ça ? ✓\n',
        'class A:\n    pass\n' * 5]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tokenizer) -> str:
  """A 2-step tiny run (smaller than configs/tiny.py, to keep the test fast)."""
  workdir = str(tmp_path_factory.mktemp('run') / 'tiny')
  script('train.py', '--config=configs/tiny.py', '--config.steps=2',
          '--config.model.vocab_size=512', f'--config.data.tokenizer={tokenizer}',
          f'--config.workdir={workdir}', '--config.model.num_layers=2', '--config.seq_len=64',
          '--config.eval_every=2', '--config.eval_batches=1', '--config.data.eval_fraction=0.05')
  return workdir


@pytest.fixture(scope='module')
def text_files(tmp_path_factory) -> str:
  folder = tmp_path_factory.mktemp('texts')
  with open(folder / 'a.jsonl', 'w', encoding='utf-8') as f:
    for doc in DOCS[:2]:
      f.write(json.dumps({'text': doc}) + '\n')
  (folder / 'b.txt').write_text(DOCS[2], encoding='utf-8')  # One paragraph: one document.
  return str(folder)


def _last_json(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


# In-process scoring with hand-derivable numbers.


def _zero_run(tokenizer, batch_size=8, seq_len=16):
  """A run whose parameters are all zero: every logit is 0, so each token costs ln V."""
  config = tiny.get_config()
  config.model.vocab_size = 512
  config.model.num_layers = 1
  config.batch_size, config.seq_len = batch_size, seq_len
  cfgs = parse(config)
  rules = AxisRules.from_config(cfgs.mesh)
  model = Transformer(cfgs.model, rules)
  params = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                        abstract_params(model, rules))
  return Run('', cfgs, Tokenizer(tokenizer), rules, model, params, 0)


def test_zero_model_costs_ln_v_per_token_and_bytes_are_the_texts_bytes(tokenizer):
  run = _zero_run(tokenizer)
  rows = score_run.pack_texts(DOCS, run.tokenizer, run.cfgs.run.seq_len)
  stream = sum(([2] + run.tokenizer.encode(d) + [3] for d in DOCS), [])
  # Every stream token but the first (BOS) is scored once; padding is not.
  assert rows[1].sum() == len(stream) - 1 < rows[1].size
  batches = score_run.global_batches(rows, run.cfgs.run.batch_size)
  assert len(batches) == 1 and batches[0][0].shape == (8, 17)  # padded to a full batch
  result = score_run.score(run, score_run.file_batches(run, rows))
  v = 512
  assert result['tokens'] == len(stream) - 1
  assert result['bytes'] == sum(len(d.encode('utf-8')) for d in DOCS)
  assert result['loss'] == pytest.approx(math.log(v), rel=1e-6)
  assert result['perplexity'] == pytest.approx(v, rel=1e-5)
  assert result['bits_per_byte'] == pytest.approx(
      result['tokens'] * math.log2(v) / result['bytes'], rel=1e-6)
  # The byte count also equals the UTF-8 bytes of the scored tokens, decoded.
  scored = rows[0][:, 1:][rows[1] > 0]
  assert len(run.tokenizer.decode(scored.tolist()).encode('utf-8')) == result['bytes']

  capped = score_run.score(run, score_run.file_batches(
      run, score_run.pack_texts(DOCS, run.tokenizer, run.cfgs.run.seq_len, max_tokens=21)))
  assert capped['tokens'] == 21
  assert capped['bytes'] == len(run.tokenizer.decode(stream[1:22]).encode('utf-8'))


def test_held_out_batches_are_cut_at_max_tokens(tokenizer):
  run = _zero_run(tokenizer, batch_size=2, seq_len=8)
  (batch, mask), = score_run.heldout(run, max_tokens=11)
  tokens = batch.tokens
  assert tokens.shape == (2, 9)
  assert mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]  # the first 11 targets, in order
  full = score_run.heldout(run)
  assert len(full) == run.cfgs.run.eval_batches and all(m.all() for _, m in full)
  np.testing.assert_array_equal(full[0][0].tokens, tokens)


def test_masked_eval_step_matches_a_numpy_sum_over_the_unmasked_targets(tokenizer):
  run = _zero_run(tokenizer)
  rng = np.random.default_rng(0)  # numpy: op-by-op jax.random would compile per shape
  params = jax.tree.map(
      lambda a: jax.device_put(rng.normal(0, 0.3, a.shape).astype(np.float32), a.sharding),
      run.params)
  tokens = rng.integers(4, 300, (8, 17)).astype(np.int32)
  mask = (rng.random((8, 16)) < 0.6).astype(np.int32)
  token_bytes = np.arange(512) % 5
  shardings = jax.tree.map(lambda a: a.sharding, run.params)
  step = make_eval_step(run.model, run.rules, (8, 17), shardings, token_bytes)
  nll, n, b = step(params, Batch(tokens), mask)
  logits = np.asarray(jax.jit(run.model.apply)({'params': params}, tokens[:, :-1]), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
  assert float(nll) == pytest.approx(((log_z - target) * mask).sum(), rel=1e-5)
  assert int(n) == mask.sum()
  assert int(b) == (token_bytes[tokens[:, 1:]] * mask).sum()


# The scripts, on a real run.


@pytest.mark.slow
def test_eval_script_scores_the_held_out_split_as_training_did(run_dir):
  result = _last_json(script('eval.py', f'--workdir={run_dir}'))
  assert set(result) == {'step', 'loss', 'perplexity', 'bits_per_byte', 'tokens', 'bytes'}
  assert result['step'] == 2
  assert result['tokens'] == 8 * 64  # eval_batches=1 batch of 8 x 64 targets
  assert result['perplexity'] == pytest.approx(math.exp(result['loss']), rel=1e-9)
  assert result['bits_per_byte'] == pytest.approx(
      result['loss'] * result['tokens'] / math.log(2) / result['bytes'], rel=1e-9)
  with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    logged = [json.loads(line) for line in f if 'eval_loss' in line]
  assert logged[-1]['step'] == 2
  assert result['loss'] == pytest.approx(logged[-1]['eval_loss'], rel=1e-5)
  assert result['bits_per_byte'] == pytest.approx(logged[-1]['eval_bits_per_byte'], rel=1e-5)


@pytest.mark.slow
def test_seq_len_scores_the_same_text_in_rows_of_another_length(run_dir, text_files):
  own = score_run.evaluate_run(run_dir)
  assert score_run.evaluate_run(run_dir, seq_len=64) == {**own, 'seq_len': 64}
  longer = score_run.evaluate_run(run_dir, seq_len=128)
  assert longer['tokens'] == 8 * 128 and longer['loss'] != own['loss']
  # Windows share one token, so a file's targets are the same at any length; what each
  # target sees before it is not.
  short, long = (score_run.evaluate_run(run_dir, files=f'{text_files}/*', seq_len=n)
                 for n in (16, 128))
  assert (short['tokens'], short['bytes']) == (long['tokens'], long['bytes'])
  assert short['loss'] != long['loss']
  with pytest.raises(ValueError, match='--seq_len must be >= 0'):
    score_run.evaluate_run(run_dir, seq_len=-8)


@pytest.mark.slow
def test_a_packed_run_with_a_chunked_loss_is_scored_as_training_scored_it(tmp_path, tokenizer,
                                                                           text_files):
  # data.segment_ids and loss.chunk change both training and scoring; the eval
  # script must score the held-out split exactly as the loop did.
  config = tiny.get_config()
  config.update_from_flattened_dict({
      'steps': 2, 'model.vocab_size': 512, 'model.num_layers': 1, 'seq_len': 32,
      'eval_every': 2, 'eval_batches': 1, 'data.eval_fraction': 0.05,
      'data.tokenizer': tokenizer, 'workdir': str(tmp_path / 'packed'),
      'data.segment_ids': True, 'loss.chunk': 8})
  trainer.train(config, handle_signals=False)
  with open(tmp_path / 'packed' / 'metrics.jsonl', encoding='utf-8') as f:
    logged = [json.loads(line) for line in f if 'eval_loss' in line][-1]
  result = score_run.evaluate_run(str(tmp_path / 'packed'))
  assert result['loss'] == pytest.approx(logged['eval_loss'], rel=1e-5)
  files = score_run.evaluate_run(str(tmp_path / 'packed'), files=f'{text_files}/*.jsonl')
  assert files['bytes'] == sum(len(d.encode('utf-8')) for d in DOCS[:2])


@pytest.mark.slow
def test_eval_script_scores_files_one_by_one(run_dir, text_files):
  proc = script('eval.py', f'--workdir={run_dir}', '--step=2',
                 f'--files={text_files}/*.jsonl,{text_files}/*.txt')
  result = _last_json(proc)
  files = result['files']
  assert sorted(files) == ['a.jsonl', 'b.txt']
  assert files['a.jsonl']['bytes'] == sum(len(d.encode('utf-8')) for d in DOCS[:2])
  assert files['b.txt']['bytes'] == len(DOCS[2].encode('utf-8'))
  assert result['tokens'] == sum(f['tokens'] for f in files.values())
  assert result['bytes'] == sum(f['bytes'] for f in files.values())
  total = sum(f['loss'] * f['tokens'] for f in files.values())
  assert result['loss'] == pytest.approx(total / result['tokens'], rel=1e-9)
  for r in (result, *files.values()):
    assert r['perplexity'] == pytest.approx(math.exp(r['loss']), rel=1e-9)
  assert result['step'] == 2
  assert 'a.jsonl: loss=' in proc.stdout and 'b.txt: loss=' in proc.stdout


@pytest.mark.slow
def test_eval_script_errors_are_one_line_naming_the_cause(run_dir):
  proc = script('eval.py', f'--workdir={run_dir}', '--step=5', check=False)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'step 5' in lines[0] and run_dir in lines[0], proc.stderr
  with pytest.raises(ValueError, match='/no/such/dir/'):
    list(score_run.file_texts('/no/such/dir/*.txt', 'text'))


@pytest.mark.slow
def test_load_errors_name_the_missing_path(tmp_path, run_dir):
  with pytest.raises(ValueError, match='no run folder at .*nowhere'):
    load_run(str(tmp_path / 'nowhere'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='no config.json'):
    load_run(str(empty))
  for name in ('config.json', 'tokenizer.model'):
    (empty / name).write_bytes(open(os.path.join(run_dir, name), 'rb').read())
  with pytest.raises(ValueError, match='no checkpoints in .*empty/checkpoints'):
    load_run(str(empty))
  assert not (empty / 'checkpoints').exists()  # Looking did not create it.


@pytest.mark.slow
def test_generate_script_is_greedy_at_temperature_zero(run_dir):
  args = (f'--workdir={run_dir}', '--prompt=def main(', '--max_new_tokens=5', '--temperature=0')
  proc = script('generate.py', *args)
  result = _last_json(proc)
  tok = Tokenizer(os.path.join(run_dir, 'tokenizer.model'))
  assert result['prompt_ids'] == [tok.bos_id] + tok.encode('def main(')
  ids = result['ids']
  assert 1 <= len(ids) <= 5 and (len(ids) == 5 or ids[-1] == tok.eos_id)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert result['text'] == tok.decode(ids)
  assert proc.stdout.splitlines()[0].startswith('def main(')
  assert 'warning' not in proc.stderr  # 5 new tokens: within the 64 trained.
  prompt = 'def f(x):\n    return x + 1\n' * 12  # Longer than the 64 tokens trained on.
  long = script('generate.py', f'--workdir={run_dir}', f'--prompt={prompt}',
                '--max_new_tokens=2', '--temperature=0')
  result = _last_json(long)
  positions = len(result['prompt_ids']) + len(result['ids'])
  assert positions > 64 and long.stderr.strip().splitlines()[-1] == (
      f'warning: positions up to {positions} go past the 64 tokens a row the model trained '
      'on (seq_len); RoPE extrapolates them'), long.stderr[-2000:]

  missing = script('generate.py', f'--workdir={run_dir}/nope', '--prompt=x', check=False)
  assert missing.returncode == 1 and f'{run_dir}/nope' in missing.stderr.strip()


def _tb_scalars(tb_dir):
  """(tag, step) -> value from TensorBoard event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(tb_dir, 'events.out.tfevents.*')):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its CRC, the record, its CRC
      for value in event.summary.value:
        out[(value.tag, event.step)] = value.simple_value
  return out


@pytest.mark.slow
def test_eval_metrics_land_in_tensorboard(run_dir):
  scalars = _tb_scalars(os.path.join(run_dir, 'tb'))
  with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    evals = [json.loads(line) for line in f if 'eval_loss' in line]
  for key in ('eval_loss', 'eval_perplexity', 'eval_bits_per_byte'):
    assert scalars[(key, 2)] == pytest.approx(evals[-1][key], rel=1e-6)
  assert ('loss', 2) in scalars


@pytest.mark.slow
def test_plot_script_writes_a_png_of_several_runs(tmp_path):
  for name, scale in (('run_a', 1.0), ('run_b', 0.8)):
    folder = tmp_path / name
    folder.mkdir()
    lines = [{'step': s, 'loss': scale * 6 / s, 'lr': 1e-3} for s in range(1, 11)]
    lines += [{'step': s, 'eval_loss': scale * 7 / s} for s in (5, 10)]
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  out = tmp_path / 'loss.png'
  proc = script('plot.py', str(tmp_path / 'run_a'), str(tmp_path / 'run_b'), f'--out={out}')
  assert proc.stdout.strip().splitlines()[-1] == str(out)
  from matplotlib import image
  pixels = image.imread(out)
  assert pixels.shape[:2] == (450, 1200)
  assert pixels[..., :3].std() > 0.05  # not a blank canvas

  bad = script('plot.py', str(tmp_path / 'run_a'), str(tmp_path / 'nope'),
                f'--out={tmp_path / "x.png"}', check=False)
  assert bad.returncode == 1 and 'nope' in bad.stderr
  assert not (tmp_path / 'x.png').exists()
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'metrics.jsonl').write_text('')
  empty = script('plot.py', str(tmp_path / 'run_a'), str(tmp_path / 'empty'),
                 f'--out={tmp_path / "x.png"}', check=False)
  assert empty.returncode == 1 and empty.stderr.strip().splitlines() == [
      f'error: nothing to plot: {tmp_path}/empty/metrics.jsonl has no train or eval loss yet']
  assert not (tmp_path / 'x.png').exists()


@pytest.mark.slow
def test_plot_prints_the_path_it_writes(tmp_path):
  run = tmp_path / 'run_a'
  run.mkdir()
  (run / 'metrics.jsonl').write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
  # Without an extension matplotlib appends '.png': the printed path must say so.
  proc = script('plot.py', str(run), f'--out={tmp_path / "curves"}')
  assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / 'curves.png')
  assert (tmp_path / 'curves.png').is_file() and not (tmp_path / 'curves').exists()
  from lm.experiments.plotting import plot_runs
  # A dot that names no format is part of the name; a format's extension is kept.
  assert plot_runs([str(run)], str(tmp_path / 'v1.2')) == str(tmp_path / 'v1.2.png')
  with pytest.raises(ValueError, match=rf'^--out: {tmp_path} is a folder; name the file'):
    plot_runs([str(run)], str(tmp_path))  # Not a silent {tmp_path}.png beside it.
  assert (tmp_path / 'v1.2.png').read_bytes().startswith(b'\x89PNG')
  assert plot_runs([str(run)], str(tmp_path / 'c.svg')) == str(tmp_path / 'c.svg')
  assert b'<svg' in (tmp_path / 'c.svg').read_bytes()[:1000]


def test_plot_curves_keep_the_last_value_of_a_repeated_step(tmp_path):
  from lm.experiments.plotting import read_curves, run_names
  lines = [{'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0}, {'step': 2, 'eval_loss': 4.5},
           {'step': 2, 'loss': 3.5}, {'step': 3, 'loss': 3.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  curves = read_curves(str(tmp_path))
  assert curves == {'loss': [(1, 5.0), (2, 3.5), (3, 3.0)], 'eval_loss': [(2, 4.5)]}
  assert run_names(['a/x', 'b/x', 'c/y']) == ['a/x', 'b/x', 'y']


def test_the_metrics_reader_and_the_resume_trim_agree_on_a_torn_last_line(tmp_path):
  from lm.run.metrics import read_records, trim_jsonl

  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
  assert [r['step'] for r in read_records(str(path))] == [1, 2]
  trim_jsonl(str(path), 10)  # What a resume does first.
  assert path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
  assert [r['step'] for r in read_records(str(path))] == [1, 2]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # Not torn: damaged.
  with pytest.raises(ValueError, match=r'metrics\.jsonl:2: '):
    read_records(str(path))
  path.write_text('{"step": 1}\n{"loss": 2.0}\n')
  with pytest.raises(ValueError, match=r'metrics\.jsonl:2: not a record with a step'):
    read_records(str(path))



@pytest.mark.slow
def test_a_run_read_with_another_tokenizer_is_refused(trained_run, tmp_path):
  import shutil

  from lm.export import hf_export

  workdir = tmp_path / 'run'
  shutil.copytree(trained_run, workdir)
  load_run(str(workdir))  # The run's own tokenizer passes.
  with open(workdir / 'tokenizer.model', 'ab') as f:
    f.write(b'\0')  # Another file: another hash.
  message = rf'^{workdir}/tokenizer.model \(sha256 \w+\) is not the tokenizer .*checkpoints/2'
  for read in (lambda: load_run(str(workdir)), lambda: hf_export.restore_run(str(workdir))):
    with pytest.raises(ValueError, match=message):
      read()


def test_a_run_folder_named_relative_to_the_working_directory_loads(trained_run, monkeypatch):
  # Orbax refuses relative paths; users type `--workdir=runs/tiny`.
  monkeypatch.chdir(os.path.dirname(trained_run))
  run = load_run(os.path.basename(trained_run))
  full = load_run(str(trained_run))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), run.params,
                                   full.params))
