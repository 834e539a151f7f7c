"""Tests of data/heldout.py: held-out batches."""

import numpy as np
import pytest

from data import sources
from data.config import DataConfig
from data.heldout import eval_batches
from data.split import is_heldout
from tests import data_helpers as h


def test_eval_batches_repeatable_and_heldout_only(tok, corpus):
  cfg, texts = corpus
  ev = [h.tokens(b) for b in eval_batches(cfg, tok, 2, 16, 1000)]
  assert ev and all(b.shape == (2, 17) and b.dtype == np.int32 for b in ev)
  again = [h.tokens(b) for b in eval_batches(cfg, tok, 2, 16, 1000)]
  assert len(again) == len(ev) and all((a == b).all() for a, b in zip(ev, again))
  docs = list(sources.documents(sources.open_source(cfg), repeat=False))
  held = {d.text for d in docs if is_heldout(d.key, cfg.eval_fraction)}
  got = set(h.stream_docs(tok, ev, by_row=False))
  assert got and got <= held
  train, _ = h.batches(cfg, tok, 80, prefetch=0)
  assert not set(h.stream_docs(tok, train)) & held
  # Two processes split the same global batches.
  assert len(eval_batches(cfg, tok, 2, 16, 3)) == 3
  halves = [eval_batches(cfg, tok, 1, 16, 3, process_index=i, process_count=2) for i in (0, 1)]
  for b, (h0, h1) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([h0.tokens, h1.tokens]), ev[b])


def test_eval_batches_needs_heldout_documents(tok, corpus):
  cfg, _ = corpus
  with pytest.raises(ValueError, match='data.eval_fraction'):
    eval_batches(DataConfig(source=cfg.source, files=cfg.files, eval_fraction=0.0),
                 tok, 2, 16, 2)
