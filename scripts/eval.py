"""Scores a trained run: python scripts/eval.py --workdir=RUN [--step=N] [--files=GLOB]
[--max_tokens=N] [--seq_len=N], or on task files: --task=PATHS [--max_examples=N]

Without --files or --task it scores the run's held-out split. The last line of stdout is
JSON: {"step", "loss", "perplexity", "bits_per_byte", "tokens", "bytes"} (+ "files" per
file). With --task (comma-separated JSON lines files or globs, one task each, named by
the file's stem; lm/eval/tasks.py): {"step", "task", "examples", "truncated", "accuracy",
"accuracy_norm"}, plus per-class and macro precision, recall and F1 and a confusion
matrix when every example offers the same choices; several tasks give {"step", "tasks"}.
--quantize=int8|int4 scores the blocks' weights quantised (lm/eval/quantize.py), to see what
quantisation costs; the JSON then adds "quantize" and "param_bytes_per_device".
"""

import json

from absl import app, flags, logging

from lm.cli import define_quantize_flags, define_run_flags

_WORKDIR, _STEP = define_run_flags()
_FILES = flags.DEFINE_string('files', '', 'Comma-separated globs of .txt/.jsonl/.parquet '
                             'files to score instead of the held-out split, each separately.')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 0, 'Score at most this many tokens of the '
                                   'held-out split, or of each file; 0 = held-out: the run\'s '
                                   'eval_batches, files: all.')
_TASK = flags.DEFINE_string('task', '', 'Comma-separated paths or globs of task files (JSON '
                            'lines of {"context", "choices", "label"}) to score, each a task.')
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'Score the first N examples of each '
                                     'task file; 0 = all.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Score rows of this many tokens instead of the '
                                 "run's seq_len (a long-context extension is judged at its "
                                 'new length); 0 = the run\'s.')
_QUANTIZE = define_quantize_flags()


def main(argv):
  logging.set_verbosity(logging.ERROR)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.eval import score_run, tasks
  from lm.eval.quantize import QuantConfig

  cli.reject_extra_args(argv)
  quant = QuantConfig(*_QUANTIZE())
  if _TASK.value:
    if _FILES.value or _MAX_TOKENS.value or _SEQ_LEN.value:
      cli.fail('--task cannot be combined with --files, --max_tokens or --seq_len')
    result = cli.run_or_exit(lambda: tasks.evaluate_tasks(
        _WORKDIR.value, _TASK.value, step=_STEP.value, max_examples=_MAX_EXAMPLES.value,
        quant=quant))
    print('\n'.join(tasks.report_lines(result)))
  else:
    if _MAX_EXAMPLES.value:
      cli.fail('--max_examples goes with --task')
    result = cli.run_or_exit(lambda: score_run.evaluate_run(
        _WORKDIR.value, step=_STEP.value, files=_FILES.value, max_tokens=_MAX_TOKENS.value,
        quant=quant, seq_len=_SEQ_LEN.value))
    print('\n'.join(score_run.report_lines(result)))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
