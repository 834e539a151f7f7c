"""Held-out batches: the same packing as training, over the held-out documents, in one pass.

eval_batches is what the trainer evaluates on and lm/eval/score_run.py scores a run with.
"""

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

from data import formats, packing
from data import reader as reader_lib
from data.batch import Batch, make_batch
from data.config import DataConfig
from data.tokenizer import Tokenizer

_T = TypeVar('_T')


def eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    add_bos: bool = True,
) -> list[Batch]:
  """Up to num_batches batches [batch_size, seq_len + 1] of held-out documents.

  Every process packs the same held-out stream into global batches of
  batch_size * process_count rows and keeps its own rows, so all processes get the
  same number of batches and the set does not depend on the process count. One pass
  in listed order: every call returns the same batches, of the form TrainBatches hands
  out (data/batch.py).
  """
  packing.check_sizes(batch_size, seq_len, process_index, process_count)
  if num_batches <= 0:
    return []
  reader_lib.check_has_documents(cfg)  # Else an empty data file reads as 'holds out none'.
  fmt = formats.of(cfg)
  windower = fmt.packer(seq_len)
  global_rows = batch_size * process_count
  wanted = num_batches * global_rows
  windows: list[np.ndarray] = []
  encode = fmt.encoder(tokenizer, seq_len, add_bos=add_bos, threads=cfg.encode_threads)
  any_docs = False
  for docs in _chunks(reader_lib.single_pass(cfg, heldout=True), 16):
    any_docs = True
    for piece in encode([d.text for d in docs]):
      windower.add(piece)
      while len(windows) < wanted and (window := windower.pop()) is not None:
        windows.append(window)
    if len(windows) >= wanted:
      break
  if fmt.whole and len(windows) < wanted and (window := windower.pop(partial=True)) is not None:
    windows.append(window)  # The last examples, in a padded row.
  if not any_docs:
    raise ValueError(
        f'no held-out documents: data.eval_fraction={cfg.eval_fraction} holds out none '
        'of this source; raise it')
  full = len(windows) // global_rows
  if not full:
    raise ValueError(
        f'the held-out documents fill {len(windows)} windows, fewer than one eval batch '
        f'of {global_rows}; raise data.eval_fraction or lower the batch size')
  first = [b * global_rows + process_index * batch_size for b in range(full)]
  return [make_batch(np.stack(windows[i:i + batch_size]), tokenizer.eos_id, cfg.segment_ids)
          for i in first]


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
  it = iter(items)
  while chunk := [x for _, x in zip(range(size), it)]:
    yield chunk
