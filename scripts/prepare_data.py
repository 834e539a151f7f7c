"""Prepares a corpus for training: quality filters, personal data scrubbed, near-duplicates
removed (MinHash), documents that overlap evaluation data dropped; on datatrove.

python scripts/prepare_data.py --input=DIR_OR_GLOB --output=DIR [--decontaminate=FILES]
    [--workers=N] [--tasks=N] [--executor=local|slurm] [--filters=web|code|none|NAMES]
    [--overwrite]

--input: .txt (one document per paragraph, as training reads them), .jsonl(.gz) and .parquet
files (a `text` column, or --text_key); a folder means every such file below it;
hub:NAME[:CONFIG] streams a dataset's --split as data.source=hub would (a Hub name, read
from the local Hugging Face cache when offline, or a local dataset folder). --output gets
00000.jsonl.gz, ... (train on them with --config.data.source=files
--config.data.files='DIR/*.jsonl.gz'), heldout/ (the --eval_fraction split, set aside as
training would hold it out of the raw input), removed/<why>/ (every dropped document),
logs/ and report.json. --decontaminate: task files or JSON lines with a `text` key,
comma-separated globs; default the test tasks of scripts/make_tasks.py; `none` for none.
--executor=slurm submits the stages as dependent SLURM job arrays and returns. The table of
stages is printed, then the report as one JSON line. docs/data_prep.md has the details.
"""

import json

from absl import app, flags, logging

_INPUT = flags.DEFINE_string('input', None, 'Folder, file or comma-separated globs to read; or '
                             'hub:NAME[:CONFIG], a dataset for datasets.load_dataset.')
_SPLIT = flags.DEFINE_string('split', 'train', 'The split of a hub: dataset.')
_TEXT_KEY = flags.DEFINE_string('text_key', 'text', 'The column that holds the text (.jsonl, '
                                '.parquet, datasets).')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder to write; must be empty or absent.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an earlier preparation in --output.')
_DECONT = flags.DEFINE_string('decontaminate', '', 'Task files (globs); default make_tasks\' '
                              'test tasks; none = only the held-out split.')
_WORKERS = flags.DEFINE_integer('workers', 1, 'Tasks run at once (processes), local executor.')
_TASKS = flags.DEFINE_integer('tasks', 0, 'Tasks per stage; 0 = one per input file.')
_EXECUTOR = flags.DEFINE_string('executor', 'local', 'local or slurm.')
_FILTERS = flags.DEFINE_string('filters', 'web', 'Comma-separated filters or presets: web ('
                               'gopher_repetition, gopher_quality, c4, fineweb), code, none.')
_PII = flags.DEFINE_bool('pii', True, 'Replace e-mail addresses, phone numbers and public IPs.')
_DEDUP = flags.DEFINE_bool('dedup', True, 'Remove near-duplicates (MinHash).')
_LINE_DEDUP = flags.DEFINE_integer('line_dedup', 0, 'Cut out every repeat of a span of this '
                                   'many consecutive lines already seen in the corpus (C4 '
                                   'does it with 3 sentences); 0 = off.')
_THRESHOLD = flags.DEFINE_float('minhash_threshold', 0.7, 'Similarity where the LSH curve '
                                'is centred.')
_HASHES = flags.DEFINE_integer('minhash_hashes', 112, 'MinHash hashes per document.')
_NGRAMS = flags.DEFINE_integer('minhash_ngrams', 5, 'Words per MinHash shingle.')
_DECONT_NGRAMS = flags.DEFINE_integer('decont_ngrams', 13, 'Words per decontamination n-gram.')
_EVAL_FRACTION = flags.DEFINE_float('eval_fraction', 0.01,
                                    'Held-out fraction (data.eval_fraction).')
_GZIP = flags.DEFINE_bool('gzip', True, 'Write .jsonl.gz (else .jsonl).')
_PARTITION = flags.DEFINE_string('slurm_partition', 'cpu', 'slurm: partition.')
_TIME = flags.DEFINE_string('slurm_time', '24:00:00', 'slurm: time limit per task.')
_CPUS = flags.DEFINE_integer('slurm_cpus', 1, 'slurm: CPUs per task.')
_ENV = flags.DEFINE_string('slurm_env', '', 'slurm: shell command run before each task '
                           '(e.g. "source .venv/bin/activate").')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from data.prep import command, report
  from lm import cli  # After flag parsing, so --help stays fast.

  cli.reject_extra_args(argv)
  values = {f: flags.FLAGS[f].value for f in (
      'input', 'split', 'text_key', 'output', 'overwrite', 'decontaminate', 'workers', 'tasks',
      'executor', 'filters', 'pii', 'dedup', 'line_dedup', 'minhash_threshold',
      'minhash_hashes', 'minhash_ngrams', 'decont_ngrams', 'eval_fraction', 'gzip')}
  values['slurm'] = {'partition': _PARTITION.value, 'time': _TIME.value,
                     'cpus_per_task': _CPUS.value}
  if _ENV.value:
    values['slurm']['env_command'] = _ENV.value
  result = cli.run_or_exit(lambda: command.prepare(values), command.PrepError)
  if 'stages' in result:
    print(report.table(result))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
