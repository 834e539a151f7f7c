"""Tests of data/packing.py: wrapping, windowing, segment ids."""

import dataclasses

import numpy as np

from data import packing
from data.batch import segment_ids
from data.heldout import eval_batches
from data.packing import Windower
from tests import data_helpers as h


def _windows(windower, partial=False):
  out = []
  while (w := windower.pop(partial)) is not None:
    assert w.dtype == np.int32 and len(w) <= windower.seq_len + 1
    out.append(w.tolist())
  return out


def test_windower_hand_checked():
  w = Windower(seq_len=4)
  for doc in ([10, 11, 12], [20], [30, 31, 32, 33, 34]):
    w.add(packing.wrap(doc, eos_id=3, bos_id=2))
  # Stream: 2 10 11 12 3 | 2 20 3 | 2 30 31 32 33 34 3; windows share their edge token.
  assert _windows(w) == [[2, 10, 11, 12, 3], [3, 2, 20, 3, 2], [2, 30, 31, 32, 33]]
  # Only the last document is still held, from its 5th token on.
  assert (w.pieces, w.offset, w.buffered) == (1, 4, 3)
  w.add(packing.wrap([40], eos_id=3, bos_id=2))
  assert _windows(w) == [[33, 34, 3, 2, 40]]
  # The rest, as a last short window; a single token has no target.
  assert _windows(w, partial=True) == [[40, 3]] and w.pop(partial=True) is None


def test_windower_without_bos_long_document():
  w = Windower(seq_len=3)
  w.add(packing.wrap(list(range(100)), eos_id=9))
  stream = list(range(100)) + [9]
  assert _windows(w) == [stream[i:i + 4] for i in range(0, 99, 3)]
  assert w.buffered == 2


def test_windower_resumes_inside_a_document():
  w = Windower(seq_len=3, offset=2)
  w.add(np.arange(10, dtype=np.int32))
  assert _windows(w) == [[2, 3, 4, 5], [5, 6, 7, 8]] and w.offset == 8


def test_segment_ids(tok, corpus):
  tokens = np.array([[3, 2, 10, 3, 2, 20], [2, 5, 6, 7, 8, 9], [2, 3, 3, 2, 4, 3]])
  np.testing.assert_array_equal(segment_ids(tokens, eos_id=3), [
      [1, 2, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1], [1, 1, 2, 3, 3, 3]])
  cfg, _ = corpus
  plain, _ = h.batches(cfg, tok, 3, prefetch=0)
  with_ids, _ = h.batches(dataclasses.replace(cfg, segment_ids=True), tok, 3, prefetch=0,
                          fields=True)
  for p, d in zip(plain, with_ids):
    assert d.loss_mask is None
    np.testing.assert_array_equal(p, d.tokens)
    seg = d.segment_ids
    assert seg.shape == p.shape and seg.dtype == np.int32 and (seg[:, 0] == 1).all()
    np.testing.assert_array_equal(np.diff(seg, axis=1), p[:, :-1] == tok.eos_id)
  ev = eval_batches(dataclasses.replace(cfg, segment_ids=True), tok, 2, 16, 1)
  assert ev[0].segment_ids is not None and ev[0].loss_mask is None
