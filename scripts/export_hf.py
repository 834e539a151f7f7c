"""Exports a run as a Hugging Face Llama folder.

python scripts/export_hf.py --workdir=RUN --out=DIR [--step=N] [--dtype=float32|bfloat16]

DIR then loads with transformers.AutoModelForCausalLM / AutoTokenizer, lm-evaluation-harness
and vLLM. DIR must not exist or be empty. The last stdout line is JSON:
{"out", "step", "params"}.
"""

import json

from absl import app, flags, logging

from lm.cli import define_run_flags

_WORKDIR, _STEP = define_run_flags()
_OUT = flags.DEFINE_string('out', None, 'Output folder; must not exist or be empty.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Dtype of the saved weights.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.export import hf_export

  # OSError too: a full disk or a read-only --out is one line, not a traceback.
  result = cli.run_or_exit(
      lambda: hf_export.export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
