"""scripts/prepare_data.py's checks and run: every bad flag, input or output is refused in
one line before anything is written; the input is only ever read."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import time
from typing import Any

from data import sources
from data.prep import decont, filters, minhash, report, steps
from data.prep.pipeline import Options, run


def _as_input_error(e: Exception) -> ValueError:
  """The reader's message names the trainer's keys; to this command they are flags."""
  message = str(e)
  for key, flag in (('data.files', '--input'), ('data.name', '--input'),
                    ('data.text_key', '--text_key')):
    message = message.replace(key, flag, 1)
  return ValueError(message)


def check_hub_input(given: str, split: str, text_key: str) -> None:
  """Opens the dataset of `--input=hub:NAME[:CONFIG]` and reads its first row, so that a
  missing dataset, split or column is refused before anything is written."""
  name, config_name = steps.hub_dataset(given)
  if not name:
    raise ValueError(f'--input: {given!r} names no dataset (hub:NAME or hub:NAME:CONFIG)')
  source = sources.HubSource(name, config_name, split, text_key)
  try:
    first = next(iter(source.rows(0, 0)), None)
  except sources.DataError as e:
    raise _as_input_error(e) from None
  if first is None:
    raise ValueError(f'--input: {given} split {split!r} holds no rows')


def input_spec(given: str) -> tuple[str, list[str]]:
  """The glob spec (data.files syntax) of `--input` and the files it names. A folder
  means every readable file below it, named relative to it as data.files='DIR/**/*.jsonl'
  would name them, so that held-out keys agree with training on the raw folder."""
  if os.path.isdir(given):
    suffixes = [s for s in sources.FILE_SUFFIXES
                if glob.glob(os.path.join(given, '**', '*' + s), recursive=True)]
    if not suffixes:
      kinds = ', '.join(sources.FILE_SUFFIXES)
      raise ValueError(f'--input: {given} holds no input files ({kinds})')
    # '*.jsonl' also matches nothing of '*.jsonl.gz', so the patterns never overlap.
    given = ','.join(os.path.join(given, '**', '*' + s) for s in suffixes)
  try:
    files = sources.resolve_files(given)
  except sources.DataError as e:
    raise _as_input_error(e) from None
  for _, path in files:
    try:
      with open(path, 'rb') as f:
        f.read(1)
    except OSError as e:
      raise ValueError(f'--input: cannot read {path}: {e.strerror}') from None
  return given, [path for _, path in files]


def check_output(output: str, overwrite: bool, inputs: list[str], bases: list[str]) -> None:
  """Refuses an output that is a file, not empty (unless --overwrite, and then only a
  folder an earlier preparation wrote), that holds an input file or lies in a folder the
  input globs read."""
  out = os.path.abspath(output)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--output: {output} is a file, not a folder')
  for path in inputs:
    if os.path.commonpath([out, os.path.abspath(path)]) == out:
      raise ValueError(f'--output: {output} holds the input file {path}; choose another folder')
  for base in bases:  # Each task globs the input again: it would read what others wrote.
    if os.path.commonpath([out, os.path.abspath(base)]) == os.path.abspath(base):
      raise ValueError(f'--output: {output} lies inside the input folder {base}, so its files '
                       'would be read as input; choose a folder outside it')
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise ValueError(f'--output: {output} is not empty (pass --overwrite to replace an '
                       'earlier preparation there)')
    earlier = os.path.exists(os.path.join(out, report.REPORT)) or os.path.isdir(
        os.path.join(out, 'logs'))
    if not earlier:
      raise ValueError(f'--output: {output} is not empty and holds no earlier preparation '
                       '(report.json or logs/); refusing to replace it even with --overwrite')


def options(flags: dict[str, Any]) -> tuple[Options, list[str]]:
  """Options from the flags' values, checked; and the input files (none for a dataset)."""
  if not flags['text_key']:
    raise ValueError('--text_key: must name the column that holds the text')
  if steps.hub_dataset(flags['input']):
    check_hub_input(flags['input'], flags['split'], flags['text_key'])
    spec, files = flags['input'], []
  else:
    spec, files = input_spec(flags['input'])
  names = filters.parse(flags['filters'])
  for key in ('workers', 'decont_ngrams', 'minhash_ngrams'):
    if flags[key] < 1:
      raise ValueError(f'--{key}: must be at least 1 (got {flags[key]})')
  if flags['line_dedup'] < 0:
    raise ValueError(f'--line_dedup: lines per span, at least 1, or 0 for off '
                     f'(got {flags["line_dedup"]})')
  if flags['tasks'] < 0:
    raise ValueError(f'--tasks: must be 0 (one per input file) or more (got {flags["tasks"]})')
  if not 0.0 <= flags['eval_fraction'] < 1.0:
    raise ValueError(f'--eval_fraction: must be in [0, 1) (got {flags["eval_fraction"]})')
  minhash.config(flags['minhash_threshold'], flags['minhash_hashes'], flags['minhash_ngrams'])
  if flags['executor'] not in ('local', 'slurm'):
    raise ValueError(f'--executor: must be local or slurm (got {flags["executor"]!r})')
  tasks = flags['tasks'] or max(len(files), 1)
  opts = Options(
      input=spec, split=flags['split'], text_key=flags['text_key'],
      output=os.path.abspath(flags['output']), filters=names, pii=flags['pii'],
      dedup=flags['dedup'], line_dedup=flags['line_dedup'],
      decontaminate=flags['decontaminate'],
      decont_ngrams=flags['decont_ngrams'], eval_fraction=flags['eval_fraction'],
      minhash_threshold=flags['minhash_threshold'], minhash_hashes=flags['minhash_hashes'],
      minhash_ngrams=flags['minhash_ngrams'], tasks=tasks, workers=flags['workers'],
      gzip=flags['gzip'], executor=flags['executor'], slurm=flags.get('slurm', {}))
  return opts, files


@contextlib.contextmanager
def _stderr_to(path: str):
  """File descriptor 2, which forked workers inherit, appended to `path` meanwhile."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, 'a') as f:
    os.dup2(f.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def prepare(flags: dict[str, Any]) -> dict[str, Any]:
  """Checks, runs and returns the report (on SLURM: what was submitted)."""
  opts, files = options(flags)
  dataset = steps.hub_dataset(opts.input)
  if dataset:  # A local dataset folder must not receive the output.
    bases = [dataset[0]] if os.path.isdir(dataset[0]) else []
  else:
    bases = [sources.glob_base(os.path.expanduser(p)) for p in opts.input.split(',')
             if any(c in p for c in '*?[')]
  check_output(flags['output'], flags['overwrite'], files, bases)
  references = decont.task_references(opts.decontaminate)  # Checked before anything is written.
  if os.path.isdir(opts.output) and os.listdir(opts.output):
    shutil.rmtree(opts.output)  # An earlier preparation, replaced on request (checked above).
  os.makedirs(opts.output, exist_ok=True)
  start = time.perf_counter()
  log = opts.path('logs', 'prepare.log')
  try:
    with _stderr_to(log):  # datatrove's task logs; the terminal gets the table.
      indexed = run(opts, references)
  except ValueError as e:  # The reader's DataError, raised inside a task.
    raise _as_input_error(e) from None
  except Exception as e:
    raise PrepError(f'a preparation task failed: {type(e).__name__}: {e} (log: {log})') from e
  if opts.executor == 'slurm':
    return {'output': opts.output, 'submitted': True, 'tasks': opts.tasks,
            'logs': opts.path('logs'), 'decontamination_ngrams': indexed}
  seconds = time.perf_counter() - start
  with open(opts.path(report.REPORT)) as f:
    result = json.load(f)
  result['seconds'] = round(seconds, 2)
  result['documents_per_second'] = round(result['input']['documents'] / max(seconds, 1e-9), 1)
  if dataset:
    result['input']['dataset'] = {'name': dataset[0], 'config': dataset[1], 'split': opts.split}
  else:
    result['input']['files'] = len(files)
  result['decontamination_ngrams'] = indexed
  report.write(opts.output, result)
  return result


class PrepError(RuntimeError):
  """A stage's task failed; the message names the task's log."""
