"""Writes offline tasks from the held-out split of the embedded corpus:

  python scripts/make_tasks.py --out=DIR [--config=configs/tiny.py] [--config.KEY=VALUE ...]
      [--next_line_examples=N] [--module_examples=N]

DIR gets stdlib_next_line.jsonl, stdlib_module_train.jsonl, stdlib_module_test.jsonl,
stdlib_helpdesk_train.jsonl and stdlib_helpdesk_test.jsonl, built only from the stdlib
files the config never trains on (its data.eval_fraction; see data/tasks/). Prints a
summary, then one JSON line: {"out", "eval_fraction", "tasks": [{"task", "path",
"examples", "files", ...}], "seconds"}.
"""

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'configs', 'tiny.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _TINY, 'Config whose held-out split the tasks come from.', lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Folder to write the task files into.')
_NEXT_LINE = flags.DEFINE_integer('next_line_examples', 1000,
                                  'Most examples in stdlib_next_line.')
_MODULE = flags.DEFINE_integer('module_examples', 64, 'Most examples per package in each '
                               'of stdlib_module_train and stdlib_module_test.')


def report_lines(result: dict) -> list[str]:
  lines = []
  for t in result['tasks']:
    line = f'{t["path"]}: {t["examples"]} examples from {t["files"]} files'
    if 'per_class' in t:
      line += '; ' + ', '.join(f'{p} {n} ({t["files_per_class"][p]} files)'
                               for p, n in t['per_class'].items())
    lines.append(line)
  return lines


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  from data.tasks import make  # After flag parsing, so --help stays fast.
  from lm import cli
  from lm.config import parse

  cli.reject_extra_args(argv)
  for flag in (_NEXT_LINE, _MODULE):
    if flag.value < 1:
      cli.fail(f'--{flag.name} must be at least 1, got {flag.value}')

  def build_and_write() -> dict:
    start = time.perf_counter()
    result = make.write_tasks(parse(_CONFIG.value).data, _OUT.value,
                                      next_line_examples=_NEXT_LINE.value,
                                      module_examples=_MODULE.value)
    return {**result, 'seconds': round(time.perf_counter() - start, 2)}

  result = cli.run_or_exit(build_and_write)
  print('\n'.join(report_lines(result)))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
