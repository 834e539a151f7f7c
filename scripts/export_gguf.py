"""Exports a run as one GGUF file for llama.cpp (and Ollama, LM Studio).

python scripts/export_gguf.py --workdir=RUN --out=FILE.gguf [--step=N] [--type=f16|q8_0]

FILE.gguf holds the Llama hyperparameters, the run's sentencepiece vocabulary and the
weights in llama.cpp's layout (lm/export/gguf_export.py says how). FILE must not exist. The
last stdout line is JSON: {"out", "step", "type", "tensors", "bytes", "seconds"}.
"""

import json

from absl import app, flags, logging

from lm.cli import define_run_flags

_WORKDIR, _STEP = define_run_flags()
_OUT = flags.DEFINE_string('out', None, 'Output file; must not exist.')
_TYPE = flags.DEFINE_enum('type', 'f16', ['f16', 'q8_0'],
                          'Matrices as float16 or q8_0 (8-bit, blocks of 32); norms stay float32.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.export import gguf_export

  result = cli.run_or_exit(lambda: gguf_export.export_gguf(
      _WORKDIR.value, _OUT.value, step=_STEP.value, qtype=_TYPE.value))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
