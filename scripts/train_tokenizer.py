"""Trains a sentencepiece tokenizer on the configured source's training split.

  python scripts/train_tokenizer.py --config=configs/tiny.py [--vocab_size=N] --out=FILE.model

Prints one JSON line: {"path", "vocab_size", "seconds"}.
"""

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # pylint: disable=g-import-not-at-top
from lm import cli  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', None, 'Default: the config\'s model.vocab_size.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the .model file.')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f'unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    return 1
  try:
    if not _OUT.value:
      raise ValueError('--out must name the .model file to write')
    config = _CONFIG.value
    cfg = data.DataConfig.from_dict(config.data)
    vocab_size = _VOCAB_SIZE.value or config.model.vocab_size
    start = time.perf_counter()
    tokenizer = data.train_tokenizer(data.training_texts(cfg), vocab_size, _OUT.value)
  except (ValueError, OSError) as e:  # User errors: a bad key, path or value.
    _fail(e)
  print(json.dumps({
      'path': tokenizer.path,
      'vocab_size': tokenizer.vocab_size,
      'seconds': round(time.perf_counter() - start, 3),
  }))
  return 0


def _fail(e: BaseException) -> None:
  cli.fail(cli.innermost(e))


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
