"""Tests of data/pipeline.py: TrainBatches resumes exactly, with or without prefetching."""

import json

import numpy as np
import pytest

from data.config import DataConfig
from data.pipeline import TrainBatches
from tests import data_helpers as h


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_is_exact_stdlib(tok, prefetch):
  cfg = DataConfig()
  kw = dict(batch_size=8, seq_len=256, prefetch=prefetch, seed=3)
  full, states = h.batches(cfg, tok, 10, **kw)
  assert all(b.shape == (8, 257) and b.dtype == np.int32 for b in full)
  rest, _ = h.batches(cfg, tok, 6, state=states[3], **kw)
  for a, b in zip(full[4:], rest):
    np.testing.assert_array_equal(a, b)
  # Resumed inside documents; small: a document number and an offset per stream.
  assert len(states[3]['streams']) == 8
  assert all(s['offset'] > 0 for s in states[3]['streams'].values())
  assert len(json.dumps(states[3])) < 2000


def test_close_drops_prefetched_batches(tok, corpus):
  cfg, _ = corpus
  full, _ = h.batches(cfg, tok, 12, batch_size=2, seq_len=16, prefetch=0)
  it = TrainBatches(cfg, tok, 2, 16, prefetch=3)
  got = [h.tokens(next(it)) for _ in range(5)]
  it.close()  # The thread has run ahead; the next batch must still be the 6th.
  got += [h.tokens(next(it)) for _ in range(7)]
  it.close()
  for a, b in zip(full, got):
    np.testing.assert_array_equal(a, b)
