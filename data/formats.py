"""data.format, picked once: what a document is, how it is encoded and how it is packed.

  'text'  a document is the text column of a record (or a file's text). It is wrapped as
          [BOS] ids EOS and the documents run end to end, cut into seq_len + 1 windows
          (packing.Windower): a window may start inside a document.
  'sft'   a document is a whole JSON record (data/sft.py): messages, a prompt and its
          response, or a task example. It is encoded with a loss flag per token and
          packed whole into padded rows (packing.RowPacker): every row starts at an
          example, and the held-out split keeps its last, part-filled row.

The source (data/sources.py), the tokenizer's training text (data/tokenizer.py), the
packing streams (data/dealing.py), the held-out batches (data/heldout.py) and the run's
summary line (data/pipeline.py) all ask `of(cfg)`; nothing else branches on the format.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from data import packing, sft

Encoder = Callable[[list[str]], list[np.ndarray]]


class Text:
  """Plain documents, packed end to end."""

  name = 'text'
  whole = False  # Documents may be split across rows.

  def text_key(self, key: str) -> str | None:
    """The column a source reads (data.text_key); None: the whole record as JSON."""
    return key

  def training_text(self, text: str) -> str:
    """What the tokenizer is trained on, from a document."""
    return text

  def encoder(self, tokenizer: Any, seq_len: int, *, add_bos: bool = True,
              threads: int = 0) -> Encoder:
    """texts -> each document's `packing.wrap` (BOS only with `add_bos`)."""
    bos = tokenizer.bos_id if add_bos else None
    encode = batch_encoder(tokenizer, threads)
    return lambda texts: [packing.wrap(ids, tokenizer.eos_id, bos) for ids in encode(texts)]

  def packer(self, seq_len: int, offset: int = 0) -> packing.Windower:
    """What cuts a stream's documents into rows, `offset` tokens into the first."""
    return packing.Windower(seq_len, offset)


class Examples(Text):
  """Fine-tuning records, each a whole example trained on its responses only."""

  name = 'sft'
  whole = True  # Packed whole: a row never starts inside an example.

  def text_key(self, key: str) -> str | None:
    return None

  def training_text(self, text: str) -> str:
    return sft.plain_text(text)

  def encoder(self, tokenizer: Any, seq_len: int, *, add_bos: bool = True,
              threads: int = 0) -> Encoder:
    """texts -> each example's [N, 2] tokens and loss flags, cut to seq_len + 1 (BOS
    always: the chat template starts with it)."""
    encode = batch_encoder(tokenizer, threads)
    return lambda texts: [e.rows for e in sft.encode_texts(
        texts, encode, tokenizer.bos_id, tokenizer.eos_id, seq_len + 1)]

  def packer(self, seq_len: int, offset: int = 0) -> packing.RowPacker:
    if offset:
      raise ValueError(f'resumes inside an example (token {offset}), but examples are '
                       'packed whole')
    return packing.RowPacker(seq_len)


FORMATS = {f.name: f for f in (Text(), Examples())}


def of(cfg: Any) -> Text:
  """The format a DataConfig names (data.format; DataConfig checks the name)."""
  return FORMATS[cfg.format]


def batch_encoder(tokenizer: Any, threads: int) -> Callable[[list[str]], list[list[int]]]:
  """texts -> their ids, encoded `threads` at a time (data.encode_threads; 0 = every core)."""
  return functools.partial(tokenizer.encode_batch, num_threads=threads or os.cpu_count() or 1)
