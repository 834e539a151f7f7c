"""Measures scripts/prepare_data.py on the embedded corpus with known injections.

python scripts/bench_prepare.py --out=DIR [--workers=1,2] [--near=25]

Builds DIR/in: the standard-library files outside configs/tiny.py's held-out split (so the
test tasks' own source files are not in it), plus exact copies, near copies with 1%, 2%,
5% and 10% of their words replaced (--near of each), documents carrying e-mail / phone / IP
and documents quoting stdlib_module_test examples. Prepares it with --filters=code once per
--workers value, then prints one JSON line per run: documents per second (and per core),
recall and precision of each injection, near-duplicate recall per edit level, the report.
"""

import json
import os
import random
import time

from absl import app, flags

_OUT = flags.DEFINE_string('out', None, 'Folder for the corpus and the prepared outputs.')
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'Worker counts to time.')
_NEAR = flags.DEFINE_integer('near', 25, 'Near copies per edit level.')
_LEVELS = (0.01, 0.02, 0.05, 0.10)


def build(out: str) -> tuple[str, str, dict]:
  from configs import tiny
  from data import split, stdlib
  from data.prep import inject
  from data.tasks.make import build_tasks
  from lm.config import parse

  data = parse(tiny.get_config()).data
  names = [n for n in stdlib.list_files() if not split.is_heldout(n, data.eval_fraction)]
  base = [stdlib.read(n) for n in names]
  base = [t for t in base if t.strip()]
  tasks = build_tasks(data)['stdlib_module_test']
  records = [{'context': e.context, 'choices': list(e.choices), 'label': e.label}
             for e in tasks]
  task_file = os.path.join(out, 'stdlib_module_test.jsonl')
  with open(task_file, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  rng = random.Random(0)
  vocab = inject.vocabulary(rng)
  truth = inject.inject(os.path.join(out, 'in'), base, rng, vocab, exact=25,
                        near=dict.fromkeys(_LEVELS, _NEAR.value), pii=25, contaminated=25,
                        task_records=records, shards=8)
  return os.path.join(out, 'in'), task_file, truth


def main(argv):
  from data.prep import command, inject

  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  corpus, task_file, truth = build(out)
  for workers in map(int, _WORKERS.value):
    target = os.path.join(out, f'out_w{workers}')
    values = dict(input=corpus, split='train', text_key='text', output=target, overwrite=True,
                  decontaminate=task_file,
                  workers=workers, tasks=8, executor='local', filters='code', pii=True,
                  dedup=True, line_dedup=0, minhash_threshold=0.7, minhash_hashes=112,
                  minhash_ngrams=5, decont_ngrams=13, eval_fraction=0.01, gzip=True, slurm={})
    start = time.perf_counter()
    result = command.prepare(values)
    seconds = time.perf_counter() - start
    docs = result['input']['documents']
    print(json.dumps({'workers': workers, 'documents': docs, 'seconds': round(seconds, 1),
                      'documents_per_second': round(docs / seconds, 1),
                      'per_core': round(docs / seconds / workers, 1),
                      'scores': inject.score(target, truth), 'report': result}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  app.run(main)
