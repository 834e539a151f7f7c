"""Tests for the data/ package: sources, split, tokenizer, packing, resume, sharding."""

import gzip
import json
import os
import subprocess
import sys
import tempfile

# datasets reads these when imported: keep its files out of ~ and off the network.
os.environ.setdefault('HF_DATASETS_CACHE', tempfile.mkdtemp(prefix='test_data_hf_'))
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'

import numpy as np
import pandas as pd
import pytest

from configs import base
from data import sources
from data import stdlib
from data.config import DataConfig
from data.packing import Packer
from data.pipeline import TrainBatches, eval_batches
from data.split import is_heldout
from data.tokenizer import Tokenizer, check_vocab, load_or_train, train_tokenizer, training_texts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi '
         'omicron pi rho sigma tau upsilon phi chi psi omega').split()


def _doc_text(i: int) -> str:
  """A unique, variable-length document (5 to 60 words) with its id in it."""
  n = 5 + (i * 37) % 56
  return f'doc{i:03d} ' + ' '.join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def _write_jsonl(path, texts, key='text'):
  with open(path, 'w', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({key: t, 'other': len(t)}) + '\n')


@pytest.fixture(scope='session')
def tok(tmp_path_factory) -> Tokenizer:
  """One small tokenizer for the whole session, trained on ~1 MB of the stdlib."""
  out = str(tmp_path_factory.mktemp('tok') / 'tok.model')
  texts = (stdlib.read(p) for p in stdlib.list_files())
  return train_tokenizer(texts, 512, out, max_bytes=1 << 20)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  """60 small documents over .jsonl, .jsonl.gz, .txt and .parquet files."""
  d = tmp_path_factory.mktemp('corpus')
  texts = [_doc_text(i) for i in range(60)]
  _write_jsonl(d / 'a.jsonl', texts[0:15])
  with gzip.open(d / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
    for t in texts[15:30]:
      f.write(json.dumps({'text': t}) + '\n')
  (d / 'c.txt').write_text('\n\n'.join(texts[30:45]) + '\n', encoding='utf-8')
  pd.DataFrame({'text': texts[45:60]}).to_parquet(d / 'd.parquet')
  globs = ','.join(str(d / p) for p in ('*.jsonl', '*.jsonl.gz', '*.txt', '*.parquet'))
  return DataConfig(source='files', files=globs, eval_fraction=0.2), texts


# Config.


def test_config_fields_match_base_config():
  base_data = base.get_config().data
  assert DataConfig.from_dict(base_data) == DataConfig()
  assert sorted(f for f in DataConfig.__dataclass_fields__) == sorted(base_data.keys())


@pytest.mark.parametrize('kwargs,key', [
    ({'source': 'nope'}, 'data.source'),
    ({'source': 'files', 'files': ' , '}, 'data.files'),
    ({'source': 'hub'}, 'data.name'),
    ({'eval_fraction': 1.0}, 'data.eval_fraction'),
    ({'eval_fraction': -0.1}, 'data.eval_fraction'),
])
def test_config_validate_names_bad_key(kwargs, key):
  with pytest.raises(ValueError, match=key):
    DataConfig(**kwargs).validate()


def test_config_rejects_unknown_key():
  with pytest.raises(ValueError, match='data.sourse'):
    DataConfig.from_dict({'sourse': 'stdlib'})


# Stdlib corpus and split.


def test_stdlib_listing_is_deterministic_and_clean():
  files = stdlib.list_files()
  stdlib.list_files.cache_clear()
  assert stdlib.list_files() == files
  assert list(files) == sorted(files) and len(files) > 500
  assert 'os.py' in files and 'json/__init__.py' in files
  for f in files:
    assert f.endswith('.py')
    assert not {'site-packages', 'dist-packages', '__pycache__'} & set(f.split('/'))


def test_stdlib_listing_excludes_third_party(tmp_path):
  for rel in ('a.py', 'pkg/b.py', 'pkg/c.txt', '__pycache__/a.cpython-311.pyc',
              '__pycache__/d.py', 'site-packages/x/e.py', 'dist-packages/f.py', 'z.pyc'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text('x = 1\n')
  assert stdlib.list_files(str(tmp_path)) == ('a.py', 'pkg/b.py')


def test_heldout_split_is_stable_disjoint_and_sized():
  keys = [f'file{i}.jsonl:{i % 97}' for i in range(20000)]
  held = {k for k in keys if is_heldout(k, 0.1)}
  assert 0.09 < len(held) / len(keys) < 0.11
  assert {k for k in keys if is_heldout(k, 0.05)} < held  # A larger share only adds.
  assert not any(is_heldout(k, 0.0) for k in keys)
  # Other processes (with other hash() salts) choose the same keys.
  code = ('from data.split import is_heldout; '
          f'print(sum(1 << i for i, k in enumerate({keys[:60]!r}) if is_heldout(k, 0.3)))')
  outs = {
      subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                     cwd=REPO, env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
      for seed in ('1', '2')
  }
  mine = sum(1 << i for i, k in enumerate(keys[:60]) if is_heldout(k, 0.3))
  assert outs == {f'{mine}\n'}


# Tokenizer.


def test_tokenizer_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 512
  assert len(tok.encode('\n')) == 1 and len(tok.encode('        ')) == 1
  lengths = tok.byte_lengths()
  assert lengths.shape == (512,) and list(lengths[:4]) == [0, 0, 0, 0]


def test_tokenizer_round_trips_stdlib_sources(tok):
  files = stdlib.list_files()
  picked = ['os.py', 'json/decoder.py', 'textwrap.py', files[0], files[-1]]
  texts = [stdlib.read(f) for f in picked]
  # This stdlib may hold no tabs or CRLF: add variants of a real file that do.
  texts += [texts[0].replace('    ', '\t'), texts[1].replace('\n', '\r\n')]
  for i, (text, ids) in enumerate(zip(texts, tok.encode_batch(texts))):
    assert ids == tok.encode(text), i
    assert tok.decode(ids) == text, i
  assert '\t' in texts[-2] and len(tok.encode(texts[0])) < 0.7 * len(texts[0])


@pytest.mark.parametrize('text', [
    'emoji 😀👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢',
    '中文 日本語のテキスト 한국어',
    'e\u0301 a\u0308\u0323 combining',
    'windows\r\nline\r\nends\r\n',
    'trailing spaces   \nand\ttabs\t\t\n\n\n   leading',
    '   ',
    '',
    'literal \u2581 lower one eighth block \u2581\u2581',
    'nul\x00 form\x0cfeed \ufeffbom \u200bzwsp',
    'مرحبا بالعالم',
])
def test_tokenizer_round_trips_unicode(tok, text):
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, 'x']) == [ids, tok.encode('x')]
  assert sum(tok.byte_lengths()[ids]) == len(text.encode('utf-8'))


def test_train_tokenizer_is_deterministic(tmp_path, corpus):
  cfg, _ = corpus
  a = train_tokenizer(training_texts(cfg), 300, str(tmp_path / 'a.model'))
  train_tokenizer(training_texts(cfg), 300, str(tmp_path / 'b.model'))
  assert (tmp_path / 'a.model').read_bytes() == (tmp_path / 'b.model').read_bytes()
  assert a.vocab_size == 300


def test_train_tokenizer_vocab_too_large(tmp_path):
  with pytest.raises(ValueError, match='vocab_size=5000'):
    train_tokenizer(['tiny text'], 5000, str(tmp_path / 'x.model'))


def test_training_texts_exclude_heldout(corpus):
  cfg, texts = corpus
  got = training_texts(cfg)
  docs = list(sources.documents(sources.open_source(cfg), repeat=False))
  assert len(docs) == 60
  assert sorted(got) == sorted(d.text for d in docs if not is_heldout(d.key, 0.2))
  assert 5 < 60 - len(list(training_texts(cfg))) < 25


def test_load_or_train(tmp_path, tok, corpus):
  cfg, _ = corpus
  with pytest.raises(ValueError, match='/no/such.model'):
    load_or_train(DataConfig(tokenizer='/no/such.model'), str(tmp_path / 'r0'), 512)
  # A given model is copied into the run folder.
  t = load_or_train(DataConfig(tokenizer=tok.path), str(tmp_path / 'r1'), 512)
  assert t.path == str(tmp_path / 'r1' / 'tokenizer.model')
  assert open(t.path, 'rb').read() == open(tok.path, 'rb').read()
  # Otherwise one is trained once, then reused.
  run = str(tmp_path / 'r2')
  t1 = load_or_train(cfg, run, 300)
  mtime = os.path.getmtime(t1.path)
  t2 = load_or_train(cfg, run, 300)
  assert t1.path == t2.path == os.path.join(run, 'tokenizer.model')
  assert os.path.getmtime(t2.path) == mtime and t2.vocab_size == 300


def test_check_vocab(tok):
  check_vocab(tok, 512)
  check_vocab(tok, 4096)
  with pytest.raises(ValueError, match='model.vocab_size'):
    check_vocab(tok, 511)


def test_missing_tokenizer_file():
  with pytest.raises(ValueError, match='/no/such/tok.model'):
    Tokenizer('/no/such/tok.model')


# Packing.


def test_packer_hand_checked():
  p = Packer(seq_len=4, eos_id=3, bos_id=2)
  for doc in ([10, 11, 12], [20], [30, 31, 32, 33, 34]):
    p.add_document(doc)
  # Stream: 2 10 11 12 3 | 2 20 3 | 2 30 31 32 33 34 3; windows share their edge token.
  got = []
  while (w := p.pop()) is not None:
    assert w.dtype == np.int32 and w.shape == (5,)
    got.append(w.tolist())
  assert got == [[2, 10, 11, 12, 3], [3, 2, 20, 3, 2], [2, 30, 31, 32, 33]]
  state = json.loads(json.dumps(p.state_dict()))
  assert state == {'buffer': [33, 34, 3]}
  q = Packer(seq_len=4, eos_id=3, bos_id=2)
  q.load_state_dict(state)
  for packer in (p, q):
    packer.add_document([40])
  assert p.pop().tolist() == q.pop().tolist() == [33, 34, 3, 2, 40]


def test_packer_without_bos_long_document():
  p = Packer(seq_len=3, eos_id=9)
  p.add_document(list(range(100)))
  windows = []
  while (w := p.pop()) is not None:
    windows.append(w.tolist())
  stream = list(range(100)) + [9]
  assert len(windows) == 33
  assert windows == [stream[i:i + 4] for i in range(0, 99, 3)]
  assert p.state_dict() == {'buffer': [99, 9]}


# Training batches.


def _batches(cfg, tok, n, state=None, **kw):
  it = TrainBatches(cfg, tok, kw.pop('batch_size', 2), kw.pop('seq_len', 16), **kw)
  if state is not None:
    it.load_state_dict(state)
  out, states = [], []
  for _ in range(n):
    out.append(next(it))
    states.append(json.loads(json.dumps(it.state_dict())))
  it.close()
  return out, states


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_is_exact_stdlib(tok, prefetch):
  cfg = DataConfig()
  kw = dict(batch_size=8, seq_len=256, prefetch=prefetch, seed=3)
  full, states = _batches(cfg, tok, 10, **kw)
  assert all(b.shape == (8, 257) and b.dtype == np.int32 for b in full)
  rest, _ = _batches(cfg, tok, 6, state=states[3], **kw)
  for a, b in zip(full[4:], rest):
    np.testing.assert_array_equal(a, b)
  assert states[3]['offset'] > 0  # Resumed inside a document.


def test_resume_is_exact_files_across_epochs(tok, corpus):
  cfg, _ = corpus
  kw = dict(batch_size=4, seq_len=64, seed=1, prefetch=0)
  n = 40
  full, states = _batches(cfg, tok, n, **kw)
  epochs = [s['position']['epoch'] for s in states]
  assert epochs[-1] >= 1, 'the test should cross an epoch'
  assert len({json.dumps(s) for s in states}) == n
  crossing = epochs.index(epochs[-1])
  for k in sorted({0, 7, 13, crossing - 1, crossing, n - 2}):
    rest, _ = _batches(cfg, tok, n - 1 - k, state=states[k], **dict(kw, prefetch=k % 3))
    for a, b in zip(full[k + 1:], rest):
      np.testing.assert_array_equal(a, b)


def test_close_drops_prefetched_batches(tok, corpus):
  cfg, _ = corpus
  full, _ = _batches(cfg, tok, 12, batch_size=2, seq_len=16, prefetch=0)
  it = TrainBatches(cfg, tok, 2, 16, prefetch=3)
  got = [next(it) for _ in range(5)]
  it.close()  # The thread has run ahead; the next batch must still be the 6th.
  got += [next(it) for _ in range(7)]
  it.close()
  for a, b in zip(full, got):
    np.testing.assert_array_equal(a, b)


def test_resume_rejects_changed_files(tok, corpus, tmp_path):
  cfg, texts = corpus
  _, states = _batches(cfg, tok, 3, prefetch=0)
  (tmp_path / 'other.jsonl').write_text('')
  _write_jsonl(tmp_path / 'other.jsonl', texts[:5])
  other = DataConfig(source='files', files=str(tmp_path / '*.jsonl'), eval_fraction=0.2)
  with pytest.raises(ValueError, match='data.files'):
    TrainBatches(other, tok, 2, 16, prefetch=0).load_state_dict(states[-1])


def _stream_docs(tok, batches):
  """Decodes the documents wholly contained in consecutive batches."""
  stream = [t for b in batches for row in b for t in row[:-1].tolist()]
  docs, cur = [], None
  for t in stream:
    if t == tok.bos_id:
      cur = []
    elif t == tok.eos_id:
      if cur is not None:
        docs.append(tok.decode(cur))
      cur = None
    elif cur is not None:
      cur.append(t)
  return docs


def test_batches_are_documents_separated_by_eos(tok, tmp_path):
  texts = [_doc_text(i) for i in range(12)]
  _write_jsonl(tmp_path / 'x.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)
  batches, _ = _batches(cfg, tok, 40, batch_size=2, seq_len=32, prefetch=0)
  stream = [t for b in batches for row in b for t in row[:-1].tolist()]
  expected = [t for text in texts for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]]
  assert stream[:len(expected)] == expected  # In order, then the next epoch.
  assert stream[len(expected):len(expected) + 5] == expected[:5]


def test_two_hosts_read_disjoint_documents(tok, tmp_path):
  texts = [_doc_text(i) for i in range(40)]
  _write_jsonl(tmp_path / 'one.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'one.jsonl'), eval_fraction=0.25)
  train = {t for i, t in enumerate(texts) if not is_heldout(f'one.jsonl:{i}', 0.25)}
  seen = []
  for host in range(2):
    it = TrainBatches(cfg, tok, 2, 32, process_index=host, process_count=2, prefetch=0)
    batches = [next(it) for _ in range(5)]
    while it.state_dict()['position']['epoch'] < 1:  # All of epoch 0, and a bit more.
      batches.append(next(it))
    seen.append(set(_stream_docs(tok, batches + [next(it) for _ in range(5)])))
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == train
  assert 0 < 40 - len(train) < 20


def test_hub_source_reads_a_local_dataset_folder(tok, tmp_path):
  texts = [_doc_text(i) for i in range(20)]
  _write_jsonl(tmp_path / 'train.jsonl', texts)
  cfg = DataConfig(source='hub', name=str(tmp_path), split='train', eval_fraction=0.2)
  docs = list(sources.documents(sources.open_source(cfg), repeat=False))
  assert [d.text for d in docs] == texts
  assert docs[3].key == f'{tmp_path}:3'
  full, states = _batches(cfg, tok, 6, prefetch=0)
  rest, _ = _batches(cfg, tok, 3, state=states[2], prefetch=0)
  for a, b in zip(full[3:], rest):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="'body'"):
    next(TrainBatches(DataConfig(source='hub', name=str(tmp_path), text_key='body'), tok, 2, 16,
                      prefetch=0))


# Held-out batches.


def test_eval_batches_repeatable_and_heldout_only(tok, corpus):
  cfg, texts = corpus
  ev = eval_batches(cfg, tok, 2, 16, 1000)
  assert ev and all(b.shape == (2, 17) and b.dtype == np.int32 for b in ev)
  again = eval_batches(cfg, tok, 2, 16, 1000)
  assert len(again) == len(ev) and all((a == b).all() for a, b in zip(ev, again))
  docs = list(sources.documents(sources.open_source(cfg), repeat=False))
  held = {d.text for d in docs if is_heldout(d.key, cfg.eval_fraction)}
  got = set(_stream_docs(tok, ev))
  assert got and got <= held
  train, _ = _batches(cfg, tok, 80, prefetch=0)
  assert not set(_stream_docs(tok, train)) & held
  # Two processes split the same global batches.
  assert len(eval_batches(cfg, tok, 2, 16, 3)) == 3
  halves = [eval_batches(cfg, tok, 1, 16, 3, process_index=i, process_count=2) for i in (0, 1)]
  for b, (h0, h1) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([h0, h1]), ev[b])


def test_eval_batches_needs_heldout_documents(tok, corpus):
  cfg, _ = corpus
  with pytest.raises(ValueError, match='data.eval_fraction'):
    eval_batches(DataConfig(source=cfg.source, files=cfg.files, eval_fraction=0.0),
                 tok, 2, 16, 2)


# Bad input.


def test_glob_matching_nothing(tmp_path):
  glob = str(tmp_path / 'missing' / '*.jsonl')
  with pytest.raises(ValueError, match='matched no files') as e:
    sources.open_source(DataConfig(source='files', files=glob))
  assert glob in str(e.value)


def test_missing_text_column(tok, tmp_path):
  _write_jsonl(tmp_path / 'x.jsonl', ['hello'], key='content')
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'))
  with pytest.raises(ValueError, match="'text'") as e:
    next(TrainBatches(cfg, tok, 2, 16, prefetch=2))
  assert str(tmp_path / 'x.jsonl') in str(e.value)


def test_unknown_source(tok):
  with pytest.raises(ValueError, match='data.source'):
    TrainBatches(DataConfig(source='web'), tok, 2, 16)


def test_no_training_documents(tok, tmp_path):
  _write_jsonl(tmp_path / 'x.jsonl', ['only one'])
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)
  with pytest.raises(ValueError, match='no training documents'):
    next(TrainBatches(cfg, tok, 2, 16, process_index=1, process_count=2, prefetch=0))


# The entry point.


def test_train_tokenizer_script(tmp_path, corpus):
  cfg, _ = corpus
  script = os.path.join(REPO, 'scripts', 'train_tokenizer.py')
  out = str(tmp_path / 'x.model')
  env = dict(os.environ, PYTHONPATH=REPO)
  ok = subprocess.run(
      [sys.executable, script, '--config=configs/tiny.py', '--vocab_size=300',
       '--config.data.source=files', f'--config.data.files={cfg.files}', f'--out={out}'],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert ok.returncode == 0, ok.stderr
  line = json.loads(ok.stdout.strip().splitlines()[-1])
  assert line['path'] == out and line['vocab_size'] == 300 and line['seconds'] >= 0
  assert Tokenizer(out).vocab_size == 300
  bad = subprocess.run(
      [sys.executable, script, '--config=configs/tiny.py', '--config.data.source=files',
       '--config.data.files=/no/where/*.jsonl', f'--out={out}'],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode != 0
  assert len(bad.stderr.strip().splitlines()) == 1 and '/no/where/*.jsonl' in bad.stderr
