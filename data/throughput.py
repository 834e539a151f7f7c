"""How fast the input pipeline hands out tokens, next to bare sentencepiece.

  python -m data.throughput [--tokenizer=FILE.model] [--batch_size=8] [--seq_len=1024]

Both figures come from the same documents: the pipeline's tokens per second over a run
of batches (read, clean, encode on several threads, pack), and the tokens per second of
one multi-threaded `SentencePieceProcessor.encode(list_of_texts, num_threads=N)` call
over the documents that run took, which bounds what any pipeline could do.
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import sentencepiece as spm

from data import reader as reader_lib
from data.config import DataConfig
from data.pipeline import TrainBatches
from data.tokenizer import Tokenizer, load_or_train


def measure(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, *,
            batches: int = 100, seed: int = 0, num_threads: int = 0) -> dict[str, Any]:
  """Pipeline and bare-sentencepiece tokens/s on the same documents, and their ratio."""
  threads = num_threads or cfg.encode_threads or os.cpu_count() or 1
  cfg = dataclasses.replace(cfg, encode_threads=threads)
  # Timed from the first batch on: documents are read ahead and encoded a chunk at a
  # time, so skipping the first batch would skip much of the work.
  start = time.perf_counter()
  with TrainBatches(cfg, tokenizer, batch_size, seq_len, seed=seed) as it:
    for _ in range(batches):
      next(it)
    pipeline_s = time.perf_counter() - start
    # Documents up to the last one a packing stream started (one process: all of them).
    taken = max(s['next'] for s in it.state_dict()['streams'].values()) + 1
  reader = reader_lib.MixtureReader(cfg, seed=seed)
  texts = [reader.next()[1].text for _ in range(taken)]
  sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
  start = time.perf_counter()
  ids = sp.encode(texts, num_threads=threads)
  bare_s = time.perf_counter() - start
  ours = batches * batch_size * seq_len / pipeline_s
  bare = sum(len(x) for x in ids) / bare_s
  return {'pipeline_tokens_per_sec': ours, 'sentencepiece_tokens_per_sec': bare,
          'ratio': ours / bare, 'threads': threads, 'documents': taken}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokenizer', default='', help='empty: train one on the source')
  parser.add_argument('--vocab_size', type=int, default=4096)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--batches', type=int, default=100)
  parser.add_argument('--threads', type=int, default=0, help='0: every core')
  parser.add_argument('--source', default='stdlib')
  parser.add_argument('--files', default='')
  args = parser.parse_args()
  cfg = DataConfig(source=args.source, files=args.files, tokenizer=args.tokenizer)
  tokenizer = load_or_train(cfg, tempfile.mkdtemp(prefix='throughput-'), args.vocab_size)
  print(json.dumps(measure(cfg, tokenizer, args.batch_size, args.seq_len,
                           batches=args.batches, num_threads=args.threads)))


if __name__ == '__main__':
  main()
