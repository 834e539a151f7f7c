"""The pipeline's own datatrove blocks: the input reader, the trainer's cleaning rules, the
held-out split, per-stage counts, a shard's reader and MinHash signatures for short texts."""

from __future__ import annotations

import gzip
import os

import numpy as np
import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.text import simplify_text

from data import cleaning, sources, split
from data.prep import decont

HUB = 'hub:'  # --input=hub:NAME[:CONFIG], as data.mixture's entries name a dataset.


def hub_dataset(spec: str) -> tuple[str, str] | None:
  """(name, config) of `--input=hub:NAME[:CONFIG]`; None for files."""
  if not spec.startswith(HUB):
    return None
  name, _, config_name = spec[len(HUB):].partition(':')
  return name, config_name


class InputReader(PipelineStep):
  """Task r of n reads files r, r+n, ... of `--input` with the trainer's own reader, so each
  document's id is the key that decides its held-out split in training ('<file>:<row>',
  paragraphs of .txt files, the `text_key` column of .jsonl and .parquet). A dataset
  (hub:NAME[:CONFIG]) is one stream: task r keeps its rows r, r+n, ..., keyed '<name>:<row>'
  as data.source=hub numbers them, so every task streams the whole split."""

  name, type = 'read', 'READER'

  def __init__(self, spec: str, split: str = 'train', text_key: str = 'text') -> None:
    super().__init__()
    self.spec, self.split, self.text_key = spec, split, text_key

  def run(self, data: DocumentsPipeline = None, rank: int = 0,
          world_size: int = 1) -> DocumentsPipeline:
    dataset = hub_dataset(self.spec)
    if dataset:
      rows = sources.HubSource(*dataset, self.split, self.text_key, (rank, world_size)).rows(0, 0)
    else:
      source = sources.FileSource(self.spec, self.text_key)
      rows = (row for shard in range(rank, len(source.shard_names), world_size)
              for row in source.rows(shard, 0))
    for key, text in rows:
      self.stat_update('documents')
      yield Document(text=text, id=key)


class Clean(PipelineStep):
  """The trainer's cleaning rules (data/cleaning.py): blank and binary documents dropped.
  Exact duplicates are left to MinHash, which finds them across tasks."""

  name, type = 'clean', 'FILTER'

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    cleaner = cleaning.Cleaner()
    for doc in data:
      reason = cleaner.verdict(doc.text)
      if reason is None:
        yield doc
      else:
        self.stat_update(f'dropped_{reason}')


class Count(PipelineStep):
  """Passes documents on, counting them and their UTF-8 bytes under `stage`."""

  type = 'COUNT'

  def __init__(self, stage: str) -> None:
    self.name = stage  # Before Stats is made: it is named after the step.
    super().__init__()

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    for doc in data:
      self.stat_update('documents')
      self.stat_update('bytes', value=len(doc.text.encode('utf-8')))
      yield doc


class HeldOutSplit(PipelineStep):
  """Sets the held-out split aside, as the trainer would hold it out of the raw input
  (data/split.py on each document's key): those documents go unchanged to
  `folder/<rank>.jsonl.gz` and their n-grams into the decontamination index; the rest go on."""

  name, type = 'heldout', 'SPLIT'

  def __init__(self, fraction: float, folder: str, index_folder: str, n_grams: int) -> None:
    super().__init__()
    self.fraction, self.folder, self.index_folder = fraction, folder, index_folder
    self.n_grams = n_grams

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    hasher = decont.NgramHasher(decont.config(self.n_grams))
    hashes: set[int] = set()
    os.makedirs(self.folder, exist_ok=True)
    with gzip.open(os.path.join(self.folder, f'{rank:05d}.jsonl.gz'), 'wb') as out:
      for doc in data:
        if split.is_heldout(doc.id, self.fraction):
          self.stat_update('heldout')
          out.write(orjson.dumps({'text': doc.text, 'id': doc.id}) + b'\n')
          hashes |= hasher(doc.text)
        else:
          yield doc
    decont.write_index(self.index_folder, f'heldout_{rank:05d}', hashes)


class ShardReader(PipelineStep):
  """Task r reads `folder/<r>.jsonl.gz` (what task r of an earlier stage wrote), so that
  document indices line up with that stage's MinHash signatures; a task that kept nothing
  wrote nothing and reads nothing."""

  name, type = 'read shard', 'READER'

  def __init__(self, folder: str) -> None:
    super().__init__()
    self.folder = folder

  def run(self, data: DocumentsPipeline = None, rank: int = 0,
          world_size: int = 1) -> DocumentsPipeline:
    path = os.path.join(self.folder, f'{rank:05d}.jsonl.gz')
    if not os.path.exists(path):
      return
    with gzip.open(path, 'rb') as f:
      for line in f:
        record = orjson.loads(line)
        yield Document(text=record['text'], id=record['id'])


class Signature(MinhashDedupSignature):
  """datatrove's MinHash signature, plus one for texts shorter than an n-gram: the hash of
  all their words, so that exact copies of short documents are still found (datatrove
  gives them no signature and never deduplicates them)."""

  def get_shingles(self, text: str):
    shingles = super().get_shingles(text)
    if shingles.size:
      return shingles
    words = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
    if not words:
      return shingles
    return np.array([[self._hash_func(' '.join(words))]], dtype=np.uint64)
