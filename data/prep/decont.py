"""Decontamination: a training document that shares a 13-word n-gram (GPT-3's rule) with
a reference document is dropped.

References are the corpus's own held-out split (written aside by steps.HeldOutSplit) and
task files: by default the test tasks scripts/make_tasks.py writes, built in memory. The
index is datatrove's (one `<name>.index.hashes` file of uint64 n-gram hashes per
reference set) and its NGramsDecontFilter does the dropping; the indexer is ours because
datatrove's pulls its references from lighteval's task registry, a download. N-grams are
taken after datatrove's text normalisation (lower case, no punctuation, digits folded), so
a reference shorter than 13 words cannot match anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text

from data import jsonl
from data.prep.words import WORDS
from data.tasks.record import example_from_record

INDEX_SUFFIX = '.index.hashes'


def config(n_grams: int) -> NGramsDecontConfig:
  return NGramsDecontConfig(n_grams=n_grams)


class NgramHasher:
  """The n-gram hashes of a text, exactly as NGramsDecontFilter computes them."""

  def __init__(self, cfg: NGramsDecontConfig) -> None:
    self._cfg = cfg
    self._hash = create_hash_func(cfg.hash_config)

  def __call__(self, text: str) -> set[int]:
    words = WORDS.word_tokenize(simplify_text(text, self._cfg.norm_config))
    return {self._hash(' '.join(g)) for g in ngrams(words, self._cfg.n_grams)}


def write_index(folder: str, name: str, hashes: Iterable[int]) -> int:
  """Writes `name`'s hashes in datatrove's index format; returns how many."""
  array = np.array(sorted(set(hashes)), dtype=np.uint64)
  os.makedirs(folder, exist_ok=True)
  array.tofile(os.path.join(folder, name + INDEX_SUFFIX))
  return int(array.size)


def task_documents(path: str) -> Iterator[str]:
  """The text of each line of a task file (context + the right choice; record.py's checks)
  or of a JSON-lines corpus (its `text`); a ValueError naming the file and line otherwise."""
  try:
    for n, record in jsonl.records(path):
      if isinstance(record, dict) and 'context' in record:  # Checked as every reader does.
        example = example_from_record(record, f'--decontaminate: {path} line {n}')
        yield example.context + example.choices[example.label]
      elif isinstance(record, dict) and isinstance(record.get('text'), str):
        yield record['text']
      else:
        raise ValueError(f'--decontaminate: {path} line {n}: expected a task record '
                         '(context, choices, label) or a "text" key')
  except jsonl.BadLine as e:
    raise ValueError(f'--decontaminate: {path} {e}') from None
  except OSError as e:
    raise ValueError(f'--decontaminate: cannot read {path}: {e.strerror}') from None


def default_task_documents() -> dict[str, list[str]]:
  """The test tasks scripts/make_tasks.py writes by default (configs/tiny.py's held-out
  split), as reference texts; the *_train tasks are fine-tuning data, not evaluation data."""
  from configs import tiny
  from data.tasks.make import build_tasks
  from lm.config import parse

  tasks = build_tasks(parse(tiny.get_config()).data)
  return {name: [e.context + e.choices[e.label] for e in examples]
          for name, examples in tasks.items() if not name.endswith('_train')}


def task_references(spec: str) -> dict[str, list[str]]:
  """Task name -> reference texts of `--decontaminate` ('' = the default tasks, 'none' =
  no task), every file read and checked."""
  if spec == 'none':
    return {}
  if not spec:
    return default_task_documents()
  from data.tasks.files import task_paths
  try:
    return {name: list(task_documents(path)) for name, path in task_paths(spec)}
  except ValueError as e:
    raise ValueError(str(e).replace('--task:', '--decontaminate:')) from None


def index_tasks(named: dict[str, list[str]], folder: str,
                cfg: NGramsDecontConfig) -> dict[str, int]:
  """Indexes each task's reference texts; returns task name -> n-gram count."""
  hasher = NgramHasher(cfg)
  return {name: write_index(folder, 'task_' + name, (h for t in texts for h in hasher(t)))
          for name, texts in named.items()}


def decont_filter(folder: str, cfg: NGramsDecontConfig,
                  exclusion_writer=None) -> NGramsDecontFilter:
  return NGramsDecontFilter(index_folder=folder, config=cfg, exclusion_writer=exclusion_writer,
                            language=WORDS)
