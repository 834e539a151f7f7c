"""Tests of data/state.py: saved, merged and restored data states continue exactly."""

import dataclasses
import json

import numpy as np
import pytest

from data import reader as reader_lib
from data import sources
from data.config import DataConfig
from data.pipeline import TrainBatches
from tests import data_helpers as h


def test_resume_is_exact_files_across_epochs(tok, corpus):
  cfg, _ = corpus
  kw = dict(batch_size=4, seq_len=64, seed=1, prefetch=0)
  n = 40
  full, states = h.batches(cfg, tok, n, **kw)
  epochs = [h.reader_position(s)['epoch'] for s in states]
  assert epochs[-1] >= 1, 'the test should cross an epoch'
  assert len({json.dumps(s) for s in states}) == n
  crossing = epochs.index(epochs[-1])
  for k in sorted({0, 7, 13, crossing - 1, crossing, n - 2}):
    rest, _ = h.batches(cfg, tok, n - 1 - k, state=states[k], **dict(kw, prefetch=k % 3))
    for a, b in zip(full[k + 1:], rest):
      np.testing.assert_array_equal(a, b)


def test_resume_rejects_changed_files(tok, corpus, tmp_path):
  cfg, texts = corpus
  _, states = h.batches(cfg, tok, 3, prefetch=0)
  (tmp_path / 'other.jsonl').write_text('')
  h.write_jsonl(tmp_path / 'other.jsonl', texts[:5])
  other = DataConfig(source='files', files=str(tmp_path / '*.jsonl'), eval_fraction=0.2)
  with pytest.raises(ValueError, match='data.files'):
    TrainBatches(other, tok, 2, 16, prefetch=0).load_state_dict(states[-1])


def test_merge_states_checks_its_input(tok, corpus):
  cfg, _ = corpus
  its = [TrainBatches(cfg, tok, 2, 16, process_index=p, process_count=2, prefetch=0)
         for p in range(2)]
  for it in its:
    next(it)
  parts = [it.state_dict() for it in its]
  with pytest.raises(ValueError, match='each of the processes once'):
    TrainBatches.merge_states([parts[0], parts[0]])
  with pytest.raises(ValueError, match='batches'):
    TrainBatches.merge_states([parts[0], dict(parts[1], batches=7)])
  # A process's own part does not restore another process, nor a different count.
  with pytest.raises(ValueError, match='merge_states'):
    its[1].load_state_dict(parts[0])
  with pytest.raises(ValueError, match='merge_states'):
    TrainBatches(cfg, tok, 4, 16, prefetch=0).load_state_dict(parts[0])
  with pytest.raises(ValueError, match='holds 2 of its 4 packing streams'):  # Nor other streams.
    TrainBatches(dataclasses.replace(cfg, streams=8), tok, 4, 16, prefetch=0).load_state_dict(
        parts[0])
  its[0].load_state_dict(parts[0])  # Its own part restores it.
  merged = TrainBatches.merge_states(parts[::-1])
  assert merged == TrainBatches.merge_states(parts) and 'process_index' not in merged
  # Several processes need streams that each feed one process.
  with pytest.raises(ValueError, match='data.streams'):
    TrainBatches(dataclasses.replace(cfg, streams=2), tok, 2, 16, process_count=2)


def test_hub_source_reads_a_local_dataset_folder(tok, tmp_path):
  texts = [h.doc_text(i) for i in range(20)]
  h.write_jsonl(tmp_path / 'train.jsonl', texts)
  cfg = DataConfig(source='hub', name=str(tmp_path), split='train', eval_fraction=0.2)
  docs = list(sources.documents(sources.open_source(cfg), repeat=False))
  assert [d.text for d in docs] == texts
  assert docs[3].key == f'{tmp_path}:3'
  full, states = h.batches(cfg, tok, 6, prefetch=0)
  rest, _ = h.batches(cfg, tok, 3, state=states[2], prefetch=0)
  for a, b in zip(full[3:], rest):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="'body'"):
    next(TrainBatches(DataConfig(source='hub', name=str(tmp_path), text_key='body'), tok, 2, 16,
                      prefetch=0))


def test_resume_is_exact_shuffled_mixture_with_cleaning(tok, corpus, tmp_path):
  cfg, _ = corpus
  # Texts 0, 0, 1, 0, 2, 1, 3, 1, ...: deduplication drops the later copies.
  rows = [h.doc_text(j) for i in range(30) for j in (i, i // 2)]
  h.write_jsonl(tmp_path / 'dup.jsonl', rows)
  mix = DataConfig(mixture=f'stdlib:1; files:{cfg.files}:2; files:{tmp_path}/dup.jsonl:3',
                   eval_fraction=0.1, dedup=True, min_chars=120)
  states = h.resume_matches(mix, tok, n=16, k=5, batch_size=4, seq_len=64, seed=5, prefetch=2)
  # The resumed pipeline reads on from the first document a stream still needs (a long
  # stdlib file holds it back), inside an epoch of the duplicated file.
  at = states[5]['reader']
  start = at['sources'][2]['position']['index']
  assert at['counter'] > 0 and start > 0
  # Up to the last document a stream started, it dropped copies of texts seen before
  # that point (so it had to rebuild the set of texts already seen).
  reader = reader_lib.MixtureReader(mix, seed=5)
  while reader.counter <= max(s['next'] for s in states[-1]['streams'].values()):
    reader.next()
  end = reader.state_dict()['sources']
  seen = {t for t in rows[:start] if len(t) >= 120}
  assert seen & set(rows[start:end[2]['position']['index']])
  assert at['sources'][2]['counts']['duplicate'] < end[2]['counts']['duplicate']
  assert end[1]['counts']['short'] > 0


def test_resume_with_segment_ids_and_more_streams_than_rows(tok, corpus):
  cfg, _ = corpus
  cfg = dataclasses.replace(cfg, streams=3, segment_ids=True)
  full, states = h.batches(cfg, tok, 8, batch_size=2, seq_len=16, prefetch=0, fields=True)
  rest, _ = h.batches(cfg, tok, 4, state=states[3], batch_size=2, seq_len=16, prefetch=1,
                      fields=True)
  for a, b in zip(full[4:], rest):
    assert a.segment_ids is not None and a.loss_mask is None
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.segment_ids, b.segment_ids)
  # Rows go round the 3 streams: batch 0 takes streams 0 and 1, batch 1 streams 2 and 0.
  # Stream 2, not started after batch 0, takes what is dealt to it from document 0 on.
  fresh = {'next': 0, 'offset': 0}
  assert states[0]['streams']['2'] == fresh and states[1]['streams']['2'] != fresh
  assert states[0]['streams']['0']['offset'] == 16 and states[1]['streams']['0']['offset'] == 32


def test_loads_a_state_of_another_stream_count(tok, corpus, caplog):
  cfg, _ = corpus
  _, states = h.batches(cfg, tok, 4, prefetch=0)
  saved = states[-1]
  # The first document no stream had started: the fresh streams begin there.
  start = max(s['next'] + (s['offset'] > 0) for s in saved['streams'].values())
  reader = reader_lib.MixtureReader(cfg, seed=0)
  docs = [reader.next()[1].text for _ in range(start + 2)]
  it = TrainBatches(dataclasses.replace(cfg, streams=4), tok, 2, 16, prefetch=0)
  with caplog.at_level('WARNING', logger='data.state'):
    it.load_state_dict(saved)
  assert '2 packing streams' in caplog.text and f'from document {start}' in caplog.text
  batch = h.tokens(next(it))
  for row, text in enumerate(docs[start:]):
    assert batch[row].tolist() == ([tok.bos_id] + tok.encode(text) + [tok.eos_id])[:17]
  after = it.state_dict()
  it.close()
  assert after['version'] == 4 and after['batches'] == 5 and len(after['dealt']) == 4
  with pytest.raises(ValueError, match='data state version 3 is not one this code reads'):
    it.load_state_dict(dict(saved, version=3))


def test_a_state_of_hosts_that_split_a_hub_source_is_refused(tok, tmp_path):
  # Earlier versions split a hub source per host, each host numbering its own rows, so
  # such a state's held-out rows differ from one process's: it cannot resume.
  h.write_jsonl(tmp_path / 'part.jsonl', [h.doc_text(i) for i in range(30)])
  hub = DataConfig(source='hub', name=str(tmp_path), eval_fraction=0.0)
  _, states = h.global_batches(hub, tok, 2, 2)
  old = {'version': 4, 'layout': 'per_process', 'process_count': 2,
         'processes': [dict(states[-1], process_index=p) for p in range(2)]}
  it = TrainBatches(hub, tok, 4, 32, process_count=2, prefetch=0)
  it.load_state_dict(states[-1])
  with pytest.raises(ValueError, match='each read and numbered their own rows of a hub source'):
    it.load_state_dict(old)
  it.close()


def test_resume_is_exact_with_lopsided_documents(tok, lopsided):
  cfg, _ = lopsided
  for prefetch in (0, 2):
    h.resume_matches(cfg, tok, n=12, k=4, batch_size=4, seq_len=32, prefetch=prefetch)
  # One process and two give the same batches and, merged, the same states; each
  # restores on the other count.
  one, one_states = h.global_batches(cfg, tok, 10, 1, rows=4)
  two, two_states = h.global_batches(cfg, tok, 10, 2, rows=4)
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(one_states, two_states):
    assert dict(a, process_count=2, process_index=0) == dict(b, process_index=0)
  for states, processes in ((two_states, 1), (one_states, 2)):
    rest, _ = h.global_batches(cfg, tok, 6, processes, state=states[3], rows=4, prefetch=1)
    for a, b in zip(one[4:], rest):
      np.testing.assert_array_equal(a, b)
