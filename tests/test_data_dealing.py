"""Tests of data/dealing.py: which stream, row and process each document goes to."""

import dataclasses

import numpy as np
import pytest

from data.config import DataConfig
from data.pipeline import TrainBatches
from data.split import is_heldout
from tests import data_helpers as h


def test_batches_are_documents_separated_by_eos(tok, tmp_path):
  texts = [h.doc_text(i) for i in range(12)]
  h.write_jsonl(tmp_path / 'x.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)
  expected = [t for text in texts for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]]
  # One stream: the documents in order, cut into consecutive windows, then the next epoch.
  batches, _ = h.batches(dataclasses.replace(cfg, streams=1), tok, 40, batch_size=2,
                        seq_len=32, prefetch=0)
  stream = [t for b in batches for row in b for t in row[:-1].tolist()]
  assert stream[:len(expected)] == expected
  assert stream[len(expected):len(expected) + 5] == expected[:5]
  # Two streams (the default for two rows): each stream is whole documents in reader
  # order, and between them they hold every document of the epoch once.
  batches, _ = h.batches(cfg, tok, 40, batch_size=2, seq_len=32, prefetch=0)
  per_stream = [h.split_docs(tok, s) for s in h.streams(batches)]
  for docs in per_stream:
    order = [texts.index(d) for d in docs]
    assert len(order) > 3 and sum(b < a for a, b in zip(order, order[1:])) <= 1  # Epochs.
  assert set(per_stream[0]) | set(per_stream[1]) == set(texts)


def _token_docs(tok, stream):
  """The document number ('docNNN' in its text) of every token of a stream."""
  bos = [i for i, t in enumerate(stream) if t == tok.bos_id] + [len(stream)]
  out = [None] * bos[0]
  for start, end in zip(bos, bos[1:]):
    name = tok.decode(stream[start + 1:end])[3:6]
    out += [int(name) if name.isdigit() else ('cut', start)] * (end - start)
  return out


def test_rows_of_a_batch_come_from_different_documents(tok, tmp_path):
  texts = [h.doc_text(i) for i in range(200)]
  h.write_jsonl(tmp_path / 'x.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'x.jsonl'), eval_fraction=0.0)
  seq_len, rows = 32, 8
  for streams in (0, 1):
    batches, _ = h.batches(dataclasses.replace(cfg, streams=streams), tok, 12,
                          batch_size=rows, seq_len=seq_len, prefetch=0)
    if streams == 0:  # Row r of every batch continues row r of the batch before.
      docs = [_token_docs(tok, s + [batches[-1][r][-1]])
              for r, s in enumerate(h.streams(batches))]
      row_docs = [[set(docs[r][b * seq_len:(b + 1) * seq_len + 1]) for r in range(rows)]
                  for b in range(len(batches))]
    else:  # The old layout: one stream cut into consecutive rows.
      flat = [t for b in batches for row in b for t in row[:-1].tolist()]
      docs = _token_docs(tok, flat + [batches[-1][-1][-1]])
      row_docs = [[set(docs[(b * rows + r) * seq_len:(b * rows + r + 1) * seq_len + 1])
                   for r in range(rows)] for b in range(len(batches))]
    shared = sum(bool(rd[r] & rd[r + 1]) for rd in row_docs for r in range(rows - 1))
    if streams == 0:
      # No document has tokens in two rows of one batch: each batch mixes 8+ documents.
      for rd in row_docs:
        assert sum(len(d) for d in rd) == len(set().union(*rd)) >= rows
    else:
      assert shared == len(batches) * (rows - 1)  # Neighbouring rows share their edge.


def test_two_hosts_tokenise_disjoint_documents(tok, tmp_path):
  texts = [h.doc_text(i) for i in range(40)]
  h.write_jsonl(tmp_path / 'one.jsonl', texts)
  cfg = DataConfig(source='files', files=str(tmp_path / 'one.jsonl'), eval_fraction=0.25)
  train = [t for i, t in enumerate(texts) if not is_heldout(f'one.jsonl:{i}', 0.25)]
  assert 0 < 40 - len(train) < 20
  # Training document n (n = 0, 1, ... over epochs) goes to the global stream of the 4
  # with the fewest characters so far; stream j is process j // 2's local row j % 2.
  dealt = _deal([len(train[n % len(train)]) for n in range(2 * len(train))], 4)
  epoch0 = []
  for host in range(2):
    it = TrainBatches(cfg, tok, 2, 32, process_index=host, process_count=2, prefetch=0)
    batches = [h.tokens(next(it))]
    while h.reader_position(it.state_dict())['epoch'] < 1:  # Every stream is past epoch 0.
      batches.append(h.tokens(next(it)))
    it.close()
    for row, stream in enumerate(h.streams(batches)):
      mine = [n for n, j in enumerate(dealt) if j == 2 * host + row]
      for n, text in zip(mine, h.split_docs(tok, stream)):
        if n < len(train):
          assert text == train[n], (host, row, n)
          epoch0.append((host, text))
  # So in an epoch no document is tokenised into two processes' rows, and each is once.
  assert sorted(text for _, text in epoch0) == sorted(train)
  assert {host for host, _ in epoch0} == {0, 1}


def _deal(lengths, k):
  """The stream of each document: of k, the one dealt the fewest characters so far (the
  lowest on a tie)."""
  totals, out = [0] * k, []
  for length in lengths:
    j = totals.index(min(totals))
    totals[j] += length
    out.append(j)
  return out


@pytest.mark.parametrize('kind', ['stdlib', 'files', 'mixture', 'more_streams', 'hub',
                                  'hub_mixture'])
def test_global_batches_do_not_depend_on_process_count(tok, corpus, kind, tmp_path):
  files, _ = corpus
  # The hub kinds stream a local dataset folder, as data.source=hub streams one.
  for f in range(3 if kind.startswith('hub') else 0):
    h.write_jsonl(tmp_path / f'part{f}.jsonl', [h.doc_text(i) for i in range(f, 45, 3)])
  cfg = {'stdlib': DataConfig(), 'files': files,
         'mixture': DataConfig(mixture=f'stdlib:1;files:{files.files}:3', dedup=True,
                               eval_fraction=0.2),
         'more_streams': dataclasses.replace(files, streams=16),
         'hub': DataConfig(source='hub', name=str(tmp_path), eval_fraction=0.2),
         'hub_mixture': DataConfig(mixture=f'hub:{tmp_path}:2;files:{files.files}:1',
                                   eval_fraction=0.2)}[kind]
  full, _ = h.global_batches(cfg, tok, 10, 1)
  for processes in (4, 2):
    got, states = h.global_batches(cfg, tok, 10, processes, prefetch=processes - 2)
    for a, b in zip(full, got):
      np.testing.assert_array_equal(a, b)
  # Elastic resume: the merged state after 4 batches on 2 processes continues on 1 or 4.
  assert sorted(states[3]['streams'], key=int) == [str(j) for j in range(cfg.streams or 8)]
  for processes in (1, 4):
    rest, _ = h.global_batches(cfg, tok, 6, processes, state=states[3], prefetch=1)
    for a, b in zip(full[4:], rest):
      np.testing.assert_array_equal(a, b)


def _spread(lengths, streams):
  """The most characters by which one stream was ever ahead of another."""
  totals, worst = [0] * (max(streams) + 1), 0
  for length, j in zip(lengths, streams):
    totals[j] += length
    worst = max(worst, max(totals) - min(totals))
  return worst


def test_documents_are_dealt_by_characters(tok, lopsided):
  cfg, texts = lopsided
  k = 4
  batches, states = h.batches(cfg, tok, 40, batch_size=k, seq_len=32, prefetch=0)
  # Each stream's whole documents, in order (all in the first epoch).
  per_stream = [[int(d[3:6]) for d in h.split_docs(tok, s)] for s in h.streams(batches)]
  assert all(docs == sorted(set(docs)) for docs in per_stream)
  # Every stream has packed all its documents before the one it is in.
  upto = min(s['next'] for s in states[-1]['streams'].values())
  stream_of = [(n, j) for j, docs in enumerate(per_stream) for n in docs if n < upto]
  assert sorted(n for n, _ in stream_of) == list(range(upto)) and upto > 16
  dealt = [j for _, j in sorted(stream_of)]
  lengths = [len(t) for t in texts[:upto]]
  # Each to the stream dealt the fewest characters so far, the lowest on a tie ...
  assert dealt == _deal(lengths, k)
  # ... so no stream is ever more than the longest document ahead of another, where
  # dealing in turn would put stream 0 far ahead.
  longest = max(len(t) for t in texts)
  assert _spread(lengths, dealt) <= longest < _spread(lengths, [n % k for n in range(upto)])
  # The state counts the characters dealt, less the least of them.
  for s in states:
    assert len(s['dealt']) == k and min(s['dealt']) == 0 and max(s['dealt']) <= longest


def test_balanced_dealing_keeps_the_queue_short(tok, lopsided):
  # Every stream hands out tokens at the same rate. Dealt in turn, stream 0 would fall
  # behind with the long documents, and the queue of documents read for the others
  # meanwhile would grow with the run (by about 1500 characters a batch here). Balanced,
  # it stays under one longest document per stream.
  cfg, texts = lopsided
  k = 4
  it = TrainBatches(cfg, tok, k, 32, prefetch=0, encode_docs=1)
  peak = 0
  for _ in range(100):  # Over two epochs.
    next(it)
    queued = [d for q in it._dealer._queues.values() for d in q]  # Held as text.
    peak = max(peak, sum(len(d.text) for d in queued if d.text is not None))
  it.close()
  assert peak <= k * max(len(t) for t in texts)
