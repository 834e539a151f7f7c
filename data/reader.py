"""Documents for training, from one source or a weighted mixture: cleaned, resumable.

A reader's state is where the next document to examine sits in each source, the
mixture's document counter and the cleaning counters: a few integers per source.

Every process reads the same sequence of training documents (data/dealing.py decides
which of them each process tokenises), so all processes agree on every reader state and
count.
"""

import logging
from collections.abc import Iterator
from typing import Any

from data import cleaning, mixture, sources, split
from data.config import DataConfig

log = logging.getLogger(__name__)


class SourceReader:
  """One source's training documents, cleaned, in a fixed order. Held-out documents
  and those cleaning drops are skipped and counted."""

  def __init__(self, cfg: DataConfig, *, seed: int):
    self.cfg = cfg
    self.source = sources.open_source(cfg)
    self._seed = seed  # Shuffles the shard (file) order of each epoch.
    self.load_state_dict({'position': sources.Position().to_dict(),
                          'counts': cleaning.zero_counts()})

  @property
  def label(self) -> str:
    return self.source.label

  def state_dict(self) -> dict[str, Any]:
    return {'position': self._pos.to_dict(), 'counts': dict(self._counts)}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self._pos = sources.Position.from_dict(state['position'])
    self._counts = cleaning.zero_counts()
    self._counts.update({k: int(v) for k, v in state['counts'].items()})
    self._cleaner = cleaning.Cleaner(self.cfg.min_chars, self.cfg.dedup)
    self._docs: Iterator[sources.Document] | None = None
    self._epoch = self._pos.epoch
    # Documents kept in this epoch; unknown (None) when resuming inside one.
    self._kept_in_epoch: int | None = 0 if self._pos.index == 0 else None

  def shard_name(self, pos: sources.Position | None = None) -> str:
    return sources.shard_name(self.source, pos or self._pos, self._seed)

  def next(self) -> sources.Document:
    """The next training document; raises if an epoch holds none."""
    if self._docs is None:
      self._replay_dedup()
      self._docs = sources.documents(self.source, self._pos, repeat=True, seed=self._seed)
    for doc in self._docs:
      if doc.position.epoch != self._epoch:
        self._end_epoch()
        self._epoch = doc.position.epoch
      self._pos = doc.position.next()
      reason = self._cleaner.verdict(doc.text, doc.position.epoch)
      if reason is None and split.is_heldout(doc.key, self.cfg.eval_fraction):
        reason = 'heldout'
      if reason is not None:
        self._counts[reason] += 1
        if reason == 'binary' and cleaning.mostly_binary(self._counts):
          raise sources.DataError(binary_message(self.label, self._counts))
        continue
      self._counts['kept'] += 1
      if self._kept_in_epoch is not None:
        self._kept_in_epoch += 1
      return doc
    raise AssertionError('documents(repeat=True) never ends')

  def _end_epoch(self) -> None:
    if cleaning.mostly_binary(self._counts, done=True):
      raise sources.DataError(binary_message(self.label, self._counts))
    if self._kept_in_epoch == 0:
      raise sources.DataError(
          f'{self.label}: has no training documents in epoch '
          f'{self._epoch} (so far: {cleaning.describe(self._counts)}); the source has too '
          'few, data.eval_fraction holds them all out, or cleaning (blank or binary '
          'documents, data.min_chars, data.dedup) drops them')
    log.info('%s: epoch %d done; documents so far: %s', self.label, self._epoch,
             cleaning.describe(self._counts))
    self._kept_in_epoch = 0

  def _replay_dedup(self) -> None:
    """Rebuilds the dedup set of the epoch up to the resume point (no tokenising)."""
    if not self._cleaner.dedup or self._pos.index == 0:
      return
    start = sources.Position(epoch=self._pos.epoch)
    for doc in sources.documents(self.source, start, repeat=False, seed=self._seed):
      if doc.position.index >= self._pos.index:
        break
      self._cleaner.verdict(doc.text, doc.position.epoch)


class MixtureReader:
  """Training documents drawn from several sources by weight (or from one source).

  Document n comes from the source `mixture.Chooser(weights, seed)(n)` picks, so the
  choice needs no saved RNG; each source keeps its own position and epochs.
  """

  def __init__(self, cfg: DataConfig, *, seed: int):
    parts = mixture.components(cfg)
    self.readers = [SourceReader(c, seed=seed) for _, c in parts]
    self._choose = mixture.Chooser([w for w, _ in parts], seed)
    self._counter = 0

  @property
  def counter(self) -> int:
    """The number of the next document (documents handed out so far)."""
    return self._counter

  def next(self) -> tuple[int, sources.Document]:
    """(source index, document) of the next training document."""
    i = self._choose(self._counter)
    doc = self.readers[i].next()
    self._counter += 1
    return i, doc

  def state_dict(self) -> dict[str, Any]:
    return {'counter': self._counter, 'sources': [r.state_dict() for r in self.readers]}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    if len(state['sources']) != len(self.readers):
      raise ValueError(
          f'data state has {len(state["sources"])} sources but the config names '
          f'{len(self.readers)}; did data.mixture change?')
    self._counter = int(state['counter'])
    for r, s in zip(self.readers, state['sources']):
      r.load_state_dict(s)


def check_has_documents(cfg: DataConfig) -> None:
  """Raises DataError naming a source (its files) that holds no documents at all.

  Run before training a tokenizer or splitting off held-out text, whose own errors
  ('no text', 'holds out none') would blame the wrong thing. Reads at most up to each
  source's first non-blank document.
  """
  for _, c in mixture.components(cfg):
    sources.open_source(c).check_has_documents()


def single_pass(cfg: DataConfig, *, heldout: bool) -> Iterator[sources.Document]:
  """One pass over the training (or held-out) documents in listed order, cleaned.

  With a mixture, sources are interleaved by weight (seed 0) until each runs out.
  """
  parts = mixture.components(cfg)
  streams = [_one_pass(c, heldout) for _, c in parts]
  live = list(range(len(parts)))
  choose = mixture.Chooser([w for w, _ in parts], 0)
  counter = 0
  while live:
    i = live[choose(counter)]
    counter += 1
    doc = next(streams[i], None)
    if doc is None:  # Spent: share its weight out among the others from here on.
      live.remove(i)
      choose = mixture.Chooser([parts[j][0] for j in live], 0)
      continue
    yield doc


def binary_message(label: str, counts: dict[str, int]) -> str:
  return (f'{label}: {counts["binary"]} of the {sum(counts.values())} documents read are '
          'binary or not UTF-8 text (NUL bytes, or mostly undecodable or control '
          'characters; see data/cleaning.py); is that the right data?')


def _one_pass(cfg: DataConfig, heldout: bool) -> Iterator[sources.Document]:
  cleaner = cleaning.Cleaner(cfg.min_chars, cfg.dedup)
  source = sources.open_source(cfg)
  counts = cleaning.zero_counts()  # Both splits: the binary check judges the source.
  for doc in sources.documents(source, repeat=False):
    reason = cleaner.verdict(doc.text)
    counts[reason or 'kept'] += 1
    if reason == 'binary' and cleaning.mostly_binary(counts):
      raise sources.DataError(binary_message(source.label, counts))
    if reason is None and split.is_heldout(doc.key, cfg.eval_fraction) == heldout:
      yield doc
  if cleaning.mostly_binary(counts, done=True):
    raise sources.DataError(binary_message(source.label, counts))
