"""Scores a trained run: python scripts/eval.py --workdir=RUN [--step=N] [--files=GLOB]
[--max_tokens=N]

Without --files it scores the run's held-out split. The last line of stdout is JSON:
{"step", "loss", "perplexity", "bits_per_byte", "tokens", "bytes"} (+ "files" per file).
"""

import json

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run folder.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
_FILES = flags.DEFINE_string('files', '', 'Comma-separated globs of .txt/.jsonl/.parquet '
                             'files to score instead of the held-out split, each separately.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 0, 'Score at most this many tokens of the '
                                   'held-out split, or of each file; 0 = held-out: the run\'s '
                                   'eval_batches, files: all.')


def main(argv):
  logging.set_verbosity(logging.ERROR)
  from lm import cli, eval_run  # After flag parsing, so --help stays fast.

  cli.reject_extra_args(argv)
  result = cli.run_or_exit(lambda: eval_run.evaluate_run(
      _WORKDIR.value, step=_STEP.value, files=_FILES.value, max_tokens=_MAX_TOKENS.value))
  print('\n'.join(eval_run.report_lines(result)))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
