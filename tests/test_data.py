"""Tests of the data/ package's config, sources, split, tokenizer, cleaning, mixtures and
errors; the packing, dealing, pipeline, state and held-out tests are in test_data_*.py."""

import copy
import dataclasses
import itertools
import json
import logging
import os
import re
import sys

import numpy as np
import pytest

from data import cleaning, mixture, sources, stdlib, throughput
from data import reader as reader_lib
from data.config import DataConfig
from data.heldout import eval_batches
from data.pipeline import TrainBatches
from data.split import is_heldout
from data.tokenizer import Tokenizer, check_vocab, load_or_train, train_tokenizer, training_texts
from tests import data_helpers as h
from tests import helpers

# Config.


@pytest.mark.parametrize('kwargs,key', [
    ({'source': 'nope'}, 'data.source'),
    ({'source': 'files', 'files': ' , '}, 'data.files'),
    ({'source': 'hub'}, 'data.name'),
    ({'eval_fraction': 1.0}, 'data.eval_fraction'),
    ({'eval_fraction': -0.1}, 'data.eval_fraction'),
])
def test_config_validate_names_bad_key(kwargs, key):
  with pytest.raises(ValueError, match=key):
    DataConfig(**kwargs)


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


@pytest.mark.slow
def test_heldout_split_is_stable_disjoint_and_sized():
  keys = [f'file{i}.jsonl:{i % 97}' for i in range(20000)]
  held = {k for k in keys if is_heldout(k, 0.1)}
  assert 0.09 < len(held) / len(keys) < 0.11
  assert {k for k in keys if is_heldout(k, 0.05)} < held  # A larger share only adds.
  assert not any(is_heldout(k, 0.0) for k in keys)
  # Other processes (with other hash() salts) choose the same keys.
  code = ('from data.split import is_heldout; '
          f'print(sum(1 << i for i, k in enumerate({keys[:60]!r}) if is_heldout(k, 0.3)))')
  outs = {helpers.run([sys.executable, '-c', code],
                      env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ('1', '2')}
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
    load_or_train(DataConfig(tokenizer='/no/such.model'), str(tmp_path / 'r0.model'), 512)
  # A given model is copied into the run folder.
  t = load_or_train(DataConfig(tokenizer=tok.path), str(tmp_path / 'r1' / 'tokenizer.model'),
                    512)
  assert t.path == str(tmp_path / 'r1' / 'tokenizer.model')
  assert open(t.path, 'rb').read() == open(tok.path, 'rb').read()
  # Otherwise one is trained once, then reused.
  run = str(tmp_path / 'r2' / 'tokenizer.model')
  t1 = load_or_train(cfg, run, 300)
  mtime = os.path.getmtime(t1.path)
  t2 = load_or_train(cfg, run, 300)
  assert t1.path == t2.path == run
  assert os.path.getmtime(t2.path) == mtime and t2.vocab_size == 300


def test_check_vocab(tok):
  check_vocab(tok, 512)
  check_vocab(tok, 4096)
  with pytest.raises(ValueError, match='model.vocab_size'):
    check_vocab(tok, 511)


def test_missing_tokenizer_file():
  with pytest.raises(ValueError, match='/no/such/tok.model'):
    Tokenizer('/no/such/tok.model')


@pytest.mark.parametrize('content', [b'', b'garbage bytes, not a model proto' * 4])
def test_garbled_tokenizer_file(tmp_path, content):
  bad = tmp_path / 'tokenizer.model'
  bad.write_bytes(content)
  with pytest.raises(ValueError, match='is not a sentencepiece model') as e:
    Tokenizer(str(bad))
  assert str(bad) in str(e.value) and '\n' not in str(e.value)
  # A garbled run folder model fails the same way when the run reuses it.
  with pytest.raises(ValueError, match='is not a sentencepiece model'):
    load_or_train(DataConfig(), str(bad), 512)


def test_bad_data_tokenizer_is_not_copied(tmp_path):
  bad = tmp_path / 'notes.model'
  bad.write_text('just some text\n')
  run = tmp_path / 'run'
  with pytest.raises(ValueError, match='data.tokenizer: .* is not a sentencepiece model') as e:
    load_or_train(DataConfig(tokenizer=str(bad)), str(run / 'tokenizer.model'), 512)
  assert str(bad) in str(e.value)
  assert not run.exists()  # Checked before anything is written.


# Cleaning.

CLEANING_TEXTS = [
    'the first real document, long enough',  # kept
    '',  # empty
    '   \n\t  ',  # empty: whitespace only
    'tiny',  # short
    'the first real document, long enough',  # duplicate
    'a second real document, also long',  # kept
    '\n\n',  # empty
    'a second real document, also long',  # duplicate
    'ok',  # short
    'the third and last real document',  # kept
]
KEPT = [CLEANING_TEXTS[i] for i in (0, 5, 9)]


def test_cleaning_counts(tok, tmp_path):
  h.write_jsonl(tmp_path / 'c.jsonl', CLEANING_TEXTS)
  base_cfg = DataConfig(source='files', files=str(tmp_path / 'c.jsonl'), eval_fraction=0.0)
  cfg = dataclasses.replace(base_cfg, min_chars=10, dedup=True)
  r = reader_lib.SourceReader(cfg, seed=0)
  assert [r.next().text for _ in range(3)] == KEPT
  assert r.state_dict()['counts'] == {
      'kept': 3, 'heldout': 0, 'empty': 3, 'short': 2, 'duplicate': 2, 'binary': 0}
  # The next epoch starts a new dedup set, so it keeps the same three.
  assert [r.next().text for _ in range(3)] == KEPT
  assert r.state_dict()['counts'] == {
      'kept': 6, 'heldout': 0, 'empty': 6, 'short': 4, 'duplicate': 4, 'binary': 0}
  # By default only blank documents go.
  r = reader_lib.SourceReader(base_cfg, seed=0)
  assert [r.next().text for _ in range(7)] == [t for t in CLEANING_TEXTS if t.strip()]
  assert r.state_dict()['counts'] == {
      'kept': 7, 'heldout': 0, 'empty': 3, 'short': 0, 'duplicate': 0, 'binary': 0}
  # The tokenizer's sample and the training batches follow the same rules.
  assert list(training_texts(cfg)) == KEPT
  it = TrainBatches(cfg, tok, 2, 8, prefetch=0)
  counts = [_counts(it)]
  for _ in range(30):
    next(it)
  counts.append(_counts(it))
  it.close()
  assert counts[0] == dict.fromkeys(counts[0], 0)
  assert counts[1]['kept'] >= 4 and counts[1]['duplicate'] >= 2


def _counts(it, source=0):
  """The cleaning counts in a pipeline's state ('binary' from 0 if a state lacks it)."""
  return {**cleaning.zero_counts(), **it.state_dict()['reader']['sources'][source]['counts']}


# Random bytes with NUL and newline taken out (so one paragraph, no NUL): binary only by
# their share of U+FFFD and control characters once decoded (about 55%).
RANDOM_BYTES = np.random.default_rng(0).bytes(3000).replace(b'\x00', b'').replace(b'\n', b'')


@pytest.mark.parametrize('text,binary', [
    ('plain text\n\twith tabs,\r\n\f and \v feeds', False),
    ('caf\ufffd cr\ufffdme, latin-1 read as UTF-8 ' * 20, False),
    (RANDOM_BYTES.decode('utf-8', 'replace'), True),
    ('text with one NUL\x00 in it', True),
    ('hello'.encode('utf-16').decode('utf-8', 'replace'), True),  # UTF-16: NULs.
    ('\ufffd\ufffd\x01 a', True),  # 3 of 5 undecodable or control: over half.
    ('\ufffd\ufffd\x01abc', False),  # 3 of 6: not over half.
    ('x' * cleaning.BINARY_HEAD + '\x00', False),  # Only the head is looked at.
])
def test_binary_rule(text, binary):
  assert cleaning.is_binary(text) == binary
  assert cleaning.Cleaner().verdict(text) == ('binary' if binary else None)


def test_binary_rule_keeps_every_stdlib_document():
  # A drop here would change every default run's data (the worst file, a KOI8-R test
  # module, is 42% undecodable).
  dropped = [p for p in stdlib.list_files() if cleaning.is_binary(stdlib.read(p))]
  assert dropped == []


def _binary_corpus(tmp_path, n_text, n_binary):
  """jsonl of text documents and binary ones (NUL bytes), interleaved."""
  texts = [h.doc_text(i) for i in range(n_text)]
  binary = [f'\x00\x01bin{i}\x00' + RANDOM_BYTES.decode('latin-1')[:200] for i in range(n_binary)]
  docs = [d for pair in itertools.zip_longest(texts, binary) for d in pair if d is not None]
  h.write_jsonl(tmp_path / 'x.jsonl', docs)
  return DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)


def test_binary_documents_are_dropped_and_counted(tok, tmp_path, caplog):
  cfg = _binary_corpus(tmp_path, 10, 2)
  (tmp_path / 'y.txt').write_bytes(RANDOM_BYTES)  # A binary file saved as text.
  cfg = dataclasses.replace(cfg, files=f'{cfg.files},{tmp_path}/y.txt')
  r = reader_lib.SourceReader(cfg, seed=0)
  caplog.set_level(logging.INFO, logger='data.reader')
  got = [r.next().text for _ in range(11)]  # One epoch and the next one's first.
  assert got[:10] == [h.doc_text(i) for i in range(10)] and got[10] == got[0]
  # The epoch's log line counts the three; the next epoch's shard order may put the
  # binary file first.
  assert '10 kept, 0 heldout, 0 empty, 0 short, 0 duplicate, 3 binary' in caplog.text
  assert r.state_dict()['counts']['kept'] == 11 and r.state_dict()['counts']['binary'] >= 3
  assert '\x00' not in ''.join(training_texts(cfg))


def test_mostly_binary_source_is_refused(tok, tmp_path):
  # Large: refused once the first BINARY_REFUSE_AFTER documents are mostly binary.
  cfg = _binary_corpus(tmp_path, 40, 80)
  for call in (lambda: next(TrainBatches(cfg, tok, 2, 16, prefetch=0)),
               lambda: list(training_texts(cfg))):
    with pytest.raises(sources.DataError, match='binary or not UTF-8') as e:
      call()
    assert str(e.value).startswith(f'data.files={cfg.files!r}: ')
    read = int(re.search(r'of the (\d+) documents read', str(e.value))[1])
    assert cleaning.BINARY_REFUSE_AFTER <= read < 120
  # Small: refused at the end of its first epoch or pass, before 'no text' and the like.
  (tmp_path / 'y.txt').write_bytes(RANDOM_BYTES + b'\x00')
  cfg = DataConfig(source='files', files=str(tmp_path / 'y.txt'))
  for call in (lambda: next(TrainBatches(cfg, tok, 2, 16, prefetch=0)),
               lambda: load_or_train(cfg, str(tmp_path / 'run' / 'tokenizer.model'), 300),
               lambda: eval_batches(cfg, tok, 2, 16, 2)):
    with pytest.raises(sources.DataError, match='1 of the 1 documents read are binary') as e:
      call()
    assert str(tmp_path / 'y.txt') in str(e.value)
  # A source with a binary minority only drops them.
  cfg = _binary_corpus(tmp_path, 40, 30)
  assert len(list(training_texts(cfg))) == 40


def test_binary_counts_in_saved_and_merged_states(tok, tmp_path):
  cfg = _binary_corpus(tmp_path, 40, 8)
  full, states = h.global_batches(cfg, tok, 10, 2)  # Merged states of two processes.
  assert states[6]['reader']['sources'][0]['counts']['binary'] == 2
  # A state saved before 'binary' was counted resumes exactly (on one process or two,
  # merging again) and counts binary documents from 0.
  old = copy.deepcopy(states[6])
  del old['reader']['sources'][0]['counts']['binary']
  it = TrainBatches(cfg, tok, 8, 32, seed=2, encode_docs=8, prefetch=0)
  it.load_state_dict(old)
  assert _counts(it)['binary'] == 0
  for want in full[7:]:
    np.testing.assert_array_equal(h.tokens(next(it)), want)
  assert _counts(it)['binary'] == 6
  it.close()
  rest, merged = h.global_batches(cfg, tok, 3, 2, state=old)
  for a, b in zip(full[7:], rest):
    np.testing.assert_array_equal(a, b)
  assert merged[-1]['reader']['sources'][0]['counts']['binary'] == 6


def test_dedup_spans_splits(tmp_path):
  texts = [h.doc_text(i % 10) for i in range(40)]
  h.write_jsonl(tmp_path / 'x.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.3, dedup=True)
  # Over one epoch every distinct text is kept exactly once, in one split.
  heldout = [d.text for d in reader_lib.single_pass(cfg, heldout=True)]
  train = []
  r = reader_lib.SourceReader(cfg, seed=0)
  while (doc := r.next()).position.epoch == 0:
    train.append(doc.text)
  assert heldout and train and sorted(heldout + train) == sorted(set(texts))
  assert sorted(train) == sorted(d.text for d in reader_lib.single_pass(cfg, heldout=False))


def test_invalid_text_is_replaced(tok, tmp_path):
  (tmp_path / 'a.jsonl').write_bytes(b'{"text": "caf\xe9 \xff"}\n{"text": "fine"}\n')
  (tmp_path / 'b.txt').write_bytes(b'para \xff one\n\npara two\n')
  cfg = DataConfig(source='files', files=f'{tmp_path}/*.jsonl,{tmp_path}/*.txt')
  got = [d.text for d in sources.documents(sources.open_source(cfg), repeat=False)]
  assert got == ['caf\ufffd \ufffd', 'fine', 'para \ufffd one', 'para two\n']
  # Lone surrogates (not valid Unicode, so not encodable) go the same way.
  assert cleaning.fix_text('lone \ud800 and \udfff') == 'lone \ufffd and \ufffd'
  for text in got:
    assert tok.decode(tok.encode(text)) == text


# Mixtures.


def test_mixture_syntax():
  spec = 'stdlib:0.3; files:/a/*.jsonl,/b/*.txt:0.6;hub:org/ds:sub:1.2;'
  assert mixture.parse(spec) == [
      mixture.Entry('stdlib', '', 0.3), mixture.Entry('files', '/a/*.jsonl,/b/*.txt', 0.6),
      mixture.Entry('hub', 'org/ds:sub', 1.2)]
  parts = mixture.components(DataConfig(mixture=spec, split='validation'))
  assert [round(w, 6) for w, _ in parts] == [0.142857, 0.285714, 0.571429]
  assert [c.source for _, c in parts] == ['stdlib', 'files', 'hub']
  assert parts[1][1].files == '/a/*.jsonl,/b/*.txt'
  assert (parts[2][1].name, parts[2][1].config_name, parts[2][1].split) == (
      'org/ds', 'sub', 'validation')
  assert mixture.components(DataConfig()) == [(1.0, DataConfig())]


@pytest.mark.parametrize('spec', [
    'stdlib', 'stdlib:0', 'stdlib:-1', 'stdlib:nan', 'web:1', 'files:1', 'stdlib:x:1', ' ; '])
def test_mixture_syntax_errors(spec):
  with pytest.raises(ValueError, match='data.mixture'):
    DataConfig(mixture=spec)


def test_mixture_proportions_follow_weights_and_seed(tmp_path):
  weights = [0.2, 0.5, 0.3]
  picks = [mixture.Chooser(weights, seed=7)(n) for n in range(20000)]
  np.testing.assert_allclose(np.bincount(picks) / len(picks), weights, atol=0.015)
  assert picks == [mixture.Chooser(weights, seed=7)(n) for n in range(20000)]
  assert picks != [mixture.Chooser(weights, seed=8)(n) for n in range(20000)]
  # The reader takes each document from the source chosen for it.
  h.write_jsonl(tmp_path / 'a.jsonl', [f'a{i} ' + h.doc_text(i) for i in range(60)])
  h.write_jsonl(tmp_path / 'b.jsonl', [f'b{i} ' + h.doc_text(i) for i in range(60)])
  cfg = DataConfig(mixture=f'files:{tmp_path}/a.jsonl:1;files:{tmp_path}/b.jsonl:3',
                   eval_fraction=0.0)
  runs = []
  for _ in range(2):
    r = reader_lib.MixtureReader(cfg, seed=3)
    runs.append([r.next() for _ in range(200)])
  assert [(i, d.text) for i, d in runs[0]] == [(i, d.text) for i, d in runs[1]]
  assert all(d.text[0] == 'ab'[i] for i, d in runs[0])
  share = sum(i for i, _ in runs[0]) / 200
  assert 0.65 < share < 0.85


# Bad input.


def test_glob_matching_nothing(tmp_path):
  glob = str(tmp_path / 'missing' / '*.jsonl')
  with pytest.raises(ValueError, match='matched no files') as e:
    sources.open_source(DataConfig(source='files', files=glob))
  assert glob in str(e.value)


def test_missing_text_column(tok, tmp_path):
  h.write_jsonl(tmp_path / 'x.jsonl', ['hello'], key='content')
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'))
  with pytest.raises(ValueError, match="'text'") as e:
    next(TrainBatches(cfg, tok, 2, 16, prefetch=2))
  assert str(tmp_path / 'x.jsonl') in str(e.value)


def test_datasets_cache_is_per_user_and_named_when_unusable(tmp_path, monkeypatch):
  h.write_jsonl(tmp_path / 'x.jsonl', ['hello'])
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  assert [d.text for d in sources.documents(sources.open_source(cfg), repeat=False)] == ['hello']
  assert (tmp_path / 'cache' / 'lm' / 'datasets').is_dir()
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  next(sources.documents(sources.open_source(cfg), repeat=False))
  assert (tmp_path / 'home' / '.cache' / 'lm' / 'datasets').is_dir()
  # A cache home under a regular file cannot be made (even by root): the error names the
  # cache folder, not the data file.
  (tmp_path / 'plain').write_text('a file')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'plain' / 'cache'))
  with pytest.raises(sources.DataError, match='datasets cache folder') as e:
    next(sources.documents(sources.open_source(cfg), repeat=False))
  msg = str(e.value)
  assert str(tmp_path / 'plain' / 'cache' / 'lm' / 'datasets') in msg
  assert 'XDG_CACHE_HOME' in msg and 'x.jsonl' not in msg and '\n' not in msg


def test_unknown_source(tok):
  with pytest.raises(ValueError, match='data.source'):
    TrainBatches(DataConfig(source='web'), tok, 2, 16)


def test_one_document_feeds_every_process(tok, tmp_path):
  # Documents are numbered over epochs and dealt to the stream with the fewest characters
  # (here, all being alike, in turn), so even a single document reaches every process's
  # rows (its copies of later epochs).
  h.write_jsonl(tmp_path / 'x.jsonl', ['only one'])
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)
  it = TrainBatches(cfg, tok, 2, 16, process_index=1, process_count=2, prefetch=0)
  stream = [tok.bos_id] + tok.encode('only one') + [tok.eos_id]
  assert h.tokens(next(it)).tolist() == [(stream * 17)[:17]] * 2
  assert sorted(it.state_dict()['streams']) == ['2', '3']  # Of global streams 0 to 3.
  it.close()


@pytest.mark.parametrize('name,content,message', [
    ('x.parquet', b'not a parquet file', 'cannot read'),
    ('x.jsonl', b'{"text": "fine"}\n{not json\n', 'line 2: not JSON'),
])
def test_unreadable_file(tok, tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  cfg = DataConfig(source='files', files=str(tmp_path / name), eval_fraction=0.0)
  with pytest.raises(ValueError, match=message) as e:
    for _ in range(3):
      next(TrainBatches(cfg, tok, 2, 16, prefetch=1))
  assert str(tmp_path / name) in str(e.value)


def test_empty_corpus_after_cleaning(tok, tmp_path):
  h.write_jsonl(tmp_path / 'x.jsonl', ['', '  \n', '\t', 'short'])
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0,
                   min_chars=10)
  with pytest.raises(ValueError, match='no training documents') as e:
    next(TrainBatches(cfg, tok, 2, 16, prefetch=0))
  assert str(tmp_path / 'x.jsonl') in str(e.value) and '3 empty, 1 short' in str(e.value)
  with pytest.raises(ValueError, match='no text'):
    train_tokenizer(training_texts(cfg), 300, str(tmp_path / 'x.model'))


@pytest.mark.parametrize('name,content', [
    ('empty.txt', b''),
    ('blank.txt', b'\n\n  \n\n\t\n'),
    ('blank.jsonl', b'{"text": ""}\n{"text": "  "}\n'),
])
def test_empty_data_file_is_named(tok, tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  cfg = DataConfig(source='files', files=str(path))
  run = tmp_path / 'run'
  # Before the tokenizer's 'no text' and the held-out split's 'holds out none'.
  for call in (lambda: load_or_train(cfg, str(run / 'tokenizer.model'), 300),
               lambda: eval_batches(cfg, tok, 2, 16, 2)):
    with pytest.raises(sources.DataError, match='no documents') as e:
      call()
    assert str(e.value).startswith('data.files=') and str(path) in str(e.value)
  assert not (run / 'tokenizer.model').exists()
  if not content:  # Training batches say the same.
    with pytest.raises(sources.DataError, match=f'{path} holds no documents'):
      next(TrainBatches(cfg, tok, 2, 16, prefetch=0))


def test_empty_files_check_is_cheap_and_names_every_file(tmp_path):
  h.write_jsonl(tmp_path / 'a.jsonl', ['', 'a document'])
  (tmp_path / 'b.parquet').write_bytes(b'not a parquet file')
  cfg = DataConfig(source='files', files=f'{tmp_path}/a.jsonl,{tmp_path}/b.parquet')
  reader_lib.check_has_documents(cfg)  # Stops at a.jsonl's document: b is never read.
  h.write_jsonl(tmp_path / 'a.jsonl', [''])
  with pytest.raises(sources.DataError, match='cannot read .*b.parquet'):
    reader_lib.check_has_documents(cfg)
  for i in range(4):
    (tmp_path / f'e{i}.txt').write_text('')
  with pytest.raises(sources.DataError) as e:
    reader_lib.check_has_documents(DataConfig(mixture=f'stdlib:1;files:{tmp_path}/e*.txt:1'))
  assert f'{tmp_path}/e0.txt, {tmp_path}/e1.txt, {tmp_path}/e2.txt and 1 more hold no' in str(
      e.value)


def test_mixture_names_its_bad_source(tok, tmp_path):
  with pytest.raises(ValueError, match='/no/where/[*].jsonl'):
    TrainBatches(DataConfig(mixture='stdlib:1;files:/no/where/*.jsonl:1'), tok, 2, 16)
  h.write_jsonl(tmp_path / 'x.jsonl', ['hello world, a document'], key='body')
  cfg = DataConfig(mixture=f'files:{tmp_path}/x.jsonl:1')
  with pytest.raises(ValueError, match="column 'text' not found") as e:
    next(TrainBatches(cfg, tok, 2, 16, prefetch=0))
  assert str(tmp_path / 'x.jsonl') in str(e.value)


def test_throughput_measure(tok, corpus):
  cfg, _ = corpus
  out = throughput.measure(cfg, tok, 2, 32, batches=3, seconds=0, num_threads=2)
  assert out['pipeline_tokens_per_sec'] > 0 and out['sentencepiece_tokens_per_sec'] > 0
  assert out['ratio'] > 0 and out['threads'] == 2 and out['documents'] > 0


# The entry point.


@pytest.mark.slow
def test_train_tokenizer_script(tmp_path, corpus):
  cfg, _ = corpus
  out = str(tmp_path / 'x.model')
  ok = helpers.script('train_tokenizer.py', '--config=configs/tiny.py', '--vocab_size=300',
                      '--config.data.source=files', f'--config.data.files={cfg.files}',
                      f'--out={out}', timeout=120)
  line = json.loads(ok.stdout.strip().splitlines()[-1])
  assert line['path'] == out and line['vocab_size'] == 300 and line['seconds'] >= 0
  assert Tokenizer(out).vocab_size == 300
  bad = helpers.script('train_tokenizer.py', '--config=configs/tiny.py',
                       '--config.data.source=files', '--config.data.files=/no/where/*.jsonl',
                       f'--out={out}', check=False, timeout=120)
  assert bad.returncode != 0
  assert len(bad.stderr.strip().splitlines()) == 1 and '/no/where/*.jsonl' in bad.stderr


@pytest.mark.parametrize('text_key', ['text', None])  # text documents and SFT records
def test_a_torn_json_line_is_named_by_its_line(tmp_path, text_key):
  from data.sources import DataError, FileSource

  path = tmp_path / 'torn.jsonl'
  path.write_text('{"text": "one", "context": "a", "choices": [" b"], "label": 0}\n\n'
                  '{"text": "two", "cont\n')
  with pytest.raises(DataError, match=rf'^data.files: {path} line 3: not JSON: '
                                      'Unterminated string'):
    list(FileSource(str(path), text_key).rows(0, 0))
