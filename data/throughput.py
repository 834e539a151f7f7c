"""How fast the input pipeline hands out tokens, next to bare sentencepiece.

  python -m data.throughput [--tokenizer=FILE.model] [--batch_size=8] [--seq_len=1024]

Both figures come from the same documents: the pipeline's tokens per second over a run
of batches (read, clean, encode on several threads, pack; `pipeline_rate`, which
lm/experiments/bench.py reports too), and the tokens per second of one multi-threaded
`SentencePieceProcessor.encode(list_of_texts, num_threads=N)` call over the documents
that run took, which bounds what any pipeline could do.
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


def pipeline_rate(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, *,
                  seed: int = 0, batches: int = 20, seconds: float = 5.0) -> dict[str, Any]:
  """Tokens/s TrainBatches (read, clean, tokenise, pack) sustains, with the batches and
  seconds timed and the documents its streams had started.

  The pipeline tokenises a chunk of documents at a time ahead of the batches (for the
  stdlib and configs/tiny.py, some hundreds of batches' worth) and prefetches batches on a
  thread, so a few batches after start-up come from text tokenised before the clock
  started (20 of them read 5-26 M tokens/s where about 2 M is sustained). So after an
  untimed first batch (start-up: opening sources, the first chunk), batches are timed
  for at least `seconds` and at least `batches` of them; what was tokenised before the
  clock started is then a small share of the window.
  """
  with TrainBatches(cfg, tokenizer, batch_size, seq_len, seed=seed) as it:
    next(it)
    n, start = 0, time.perf_counter()
    while n < batches or time.perf_counter() - start < seconds:
      next(it)
      n += 1
    elapsed = time.perf_counter() - start
    # Documents up to the last one a packing stream started (one process: all of them).
    taken = max(s['next'] for s in it.state_dict()['streams'].values()) + 1
  return {'tokens_per_sec': n * batch_size * seq_len / elapsed, 'batches': n,
          'seconds': elapsed, 'documents': taken}


def measure(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, *,
            batches: int = 100, seconds: float = 5.0, seed: int = 0,
            num_threads: int = 0) -> dict[str, Any]:
  """Pipeline and bare-sentencepiece tokens/s on the same documents, and their ratio."""
  threads = num_threads or cfg.encode_threads or os.cpu_count() or 1
  cfg = dataclasses.replace(cfg, encode_threads=threads)
  rate = pipeline_rate(cfg, tokenizer, batch_size, seq_len, seed=seed, batches=batches,
                       seconds=seconds)
  reader = reader_lib.MixtureReader(cfg, seed=seed)
  texts = [reader.next()[1].text for _ in range(rate['documents'])]
  sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
  start = time.perf_counter()
  ids = sp.encode(texts, num_threads=threads)
  bare = sum(len(x) for x in ids) / (time.perf_counter() - start)
  return {'pipeline_tokens_per_sec': rate['tokens_per_sec'],
          'sentencepiece_tokens_per_sec': bare, 'ratio': rate['tokens_per_sec'] / bare,
          'threads': threads, 'documents': rate['documents']}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokenizer', default='', help='empty: train one on the source')
  parser.add_argument('--vocab_size', type=int, default=4096)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--batches', type=int, default=100, help='timed: at least this many')
  parser.add_argument('--seconds', type=float, default=5.0, help='timed: at least this long')
  parser.add_argument('--threads', type=int, default=0, help='0: every core')
  parser.add_argument('--source', default='stdlib')
  parser.add_argument('--files', default='')
  args = parser.parse_args()
  cfg = DataConfig(source=args.source, files=args.files, tokenizer=args.tokenizer)
  tokenizer = load_or_train(cfg, os.path.join(tempfile.mkdtemp(prefix='throughput-'), 'tok.model'),
                            args.vocab_size)
  print(json.dumps(measure(cfg, tokenizer, args.batch_size, args.seq_len,
                           batches=args.batches, seconds=args.seconds,
                           num_threads=args.threads)))


if __name__ == '__main__':
  main()
