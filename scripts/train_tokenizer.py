"""Trains a sentencepiece tokenizer on the configured source's training split.

  python scripts/train_tokenizer.py --config=configs/tiny.py [--vocab_size=N] --out=FILE.model

Prints one JSON line: {"path", "vocab_size", "seconds"}.
"""

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', None, 'Default: the config\'s model.vocab_size.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the .model file.')


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  import data  # After flag parsing, so --help stays fast.
  from lm import cli
  from lm.config import parse

  cli.reject_extra_args(argv)

  def train() -> dict:
    if not _OUT.value:
      raise ValueError('--out must name the .model file to write')
    cfgs = parse(_CONFIG.value)  # Every key checked, as training checks it.
    vocab_size = _VOCAB_SIZE.value or cfgs.model.vocab_size
    start = time.perf_counter()
    tokenizer = data.train_tokenizer(data.training_texts(cfgs.data), vocab_size, _OUT.value)
    return {'path': tokenizer.path, 'vocab_size': tokenizer.vocab_size,
            'seconds': round(time.perf_counter() - start, 3)}

  print(json.dumps(cli.run_or_exit(train)))


if __name__ == '__main__':
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
