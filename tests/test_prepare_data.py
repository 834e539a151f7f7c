"""Tests of scripts/prepare_data.py (data/prep/): known injections found and counted, the
output trains and resumes, workers do not change it, SLURM runs it, bad input refused."""

import gzip
import json
import os
import random
import sys

import numpy as np
import pytest

from data import split
from data.prep import command, inject, minhash, pii, report
from data.prep.filters import CodeFilter
from tests import data_helpers as h
from tests import helpers

EXACT, NEAR, PII_DOCS, CONTAMINATED = 10, 40, 10, 10


def flags(input_, output, **kw):
  values = dict(input=str(input_), split='train', text_key='text', output=str(output),
                overwrite=False, decontaminate='none', workers=1, tasks=0, executor='local',
                filters='none', pii=True, dedup=True, line_dedup=0,
                minhash_threshold=0.7, minhash_hashes=112, minhash_ngrams=5, decont_ngrams=13,
                eval_fraction=0.0, gzip=True, slurm={})
  values.update(kw)
  return values


def task_records(rng, vocab, n):
  return [{'context': inject.random_words(rng, 30, vocab) + ' ', 'choices': ['yes', 'no'],
           'label': i % 2} for i in range(n)]


def make_corpus(root, base_docs=300, words=200, near=NEAR, edit=0.01, seed=0):
  """Random-word documents (distinct by construction) with every kind injected."""
  rng = random.Random(seed)
  vocab = inject.vocabulary(rng)
  base = [inject.random_words(rng, words, vocab) for _ in range(base_docs)]
  records = task_records(rng, vocab, CONTAMINATED)
  tasks = root / 'task_quotes.jsonl'
  tasks.write_text(''.join(json.dumps(r) + '\n' for r in records))
  truth = inject.inject(str(root / 'in'), base, rng, vocab, exact=EXACT, near=near,
                        edit_fraction=edit, pii=PII_DOCS, contaminated=CONTAMINATED,
                        task_records=records)
  return root / 'in', tasks, truth


def read_output(folder):
  out = set()
  for name in sorted(os.listdir(folder)):
    if name.endswith('.jsonl.gz'):
      with gzip.open(folder / name, 'rt') as f:
        out |= {(r['id'], r['text']) for r in map(json.loads, f)}
  return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('prep')
  corpus, tasks, truth = make_corpus(root)
  result = command.prepare(flags(corpus, root / 'out', decontaminate=str(tasks), tasks=2))
  return root, corpus, tasks, truth, result


def test_injections_are_found_and_counted(prepared):
  root, _, _, truth, result = prepared
  scores = inject.score(str(root / 'out'), truth)
  assert scores['exact'] == {'injected': EXACT, 'found': EXACT, 'recall': 1.0}
  assert scores['near']['injected'] == NEAR and scores['near']['recall'] >= 0.95, scores['near']
  assert scores['false_merges'] == 0, scores['false_merge_ids']
  for kind in inject.PII:
    assert scores['pii'][kind] == {'injected': PII_DOCS, 'left': 0}, kind
  assert scores['contaminated'] == {'injected': CONTAMINATED, 'dropped': CONTAMINATED,
                                    'recall': 1.0, 'dropped_total': CONTAMINATED,
                                    'precision': 1.0}
  # The report's counts are the injections.
  assert {k: result['pii'][k] for k in ('email', 'phone', 'ip')} == dict.fromkeys(inject.PII,
                                                                                   PII_DOCS)
  assert result['pii']['documents'] == PII_DOCS
  assert result['contaminated'] == {'documents': CONTAMINATED,
                                    'by_reference': {'task_quotes': CONTAMINATED}}
  found = scores['exact']['found'] + scores['near']['found']
  assert result['duplicates']['removed'] == scores['duplicates_removed'] == found
  assert result['input']['documents'] == len(truth['docs'])
  assert result['output']['documents'] == len(truth['docs']) - found - CONTAMINATED
  assert len(read_output(root / 'out')) == result['output']['documents']
  rows = {r['stage']: r for r in result['stages']}
  assert rows['deduplicate']['removed'] == {'duplicate': found}
  assert rows['decontaminate']['removed'] == {'contaminated': CONTAMINATED}
  with open(root / 'out' / 'report.json') as f:
    assert json.load(f) == result
  assert not (root / 'out' / 'work').exists()


def test_pii_is_replaced_in_the_output(prepared):
  root, _, _, truth, _ = prepared
  texts = dict(read_output(root / 'out'))
  pii_docs = [k for k, v in truth['docs'].items() if v['kind'] == 'pii']
  for key in pii_docs:
    assert texts[key].startswith(f'Contact {pii.PLACEHOLDERS["email"]} or call '
                                 f'{pii.PLACEHOLDERS["phone"]}; the server is at '
                                 f'{pii.PLACEHOLDERS["ip"]}.\n'), texts[key][:120]


def test_two_workers_give_the_same_output(prepared, tmp_path):
  root, corpus, tasks, _, result = prepared
  again = command.prepare(flags(corpus, tmp_path / 'out', decontaminate=str(tasks), tasks=2,
                                workers=2))
  assert read_output(tmp_path / 'out') == read_output(root / 'out')
  drop = ('seconds', 'documents_per_second', 'options')
  assert {k: v for k, v in again.items() if k not in drop} == {
      k: v for k, v in result.items() if k not in drop}


def test_prepared_output_trains_and_resumes(prepared, tok):
  from data.config import DataConfig

  root = prepared[0]
  files = str(root / 'out' / '*.jsonl.gz')
  cfg = DataConfig(source='files', files=files, eval_fraction=0.05)
  h.resume_matches(cfg, tok, n=8, k=3, batch_size=4, seq_len=64, seed=0, prefetch=0)
  line = report.header_line(files)
  kept = prepared[4]['output']['documents']
  assert f'{kept:,} of {len(prepared[3]["docs"]):,} documents kept' in line
  assert f'{CONTAMINATED} contaminated' in line


def test_heldout_split_is_set_aside_and_decontaminates(tmp_path):
  rng = random.Random(1)
  vocab = inject.vocabulary(rng)
  docs = [inject.random_words(rng, 60, vocab) for _ in range(40)]
  keys = [f'a.jsonl:{i}' for i in range(len(docs))]
  held = [i for i, k in enumerate(keys) if split.is_heldout(k, 0.3)]
  assert 3 <= len(held) < len(docs) - 3
  # Two training documents become ones quoting 20 words of a held-out one, and 12 (too few).
  quote, short = docs[held[0]].split()[5:25], docs[held[1]].split()[5:17]
  train = [i for i in range(len(docs)) if i not in held]
  docs[train[0]] = ' '.join(quote) + ' ' + inject.random_words(rng, 30, vocab)
  docs[train[1]] = ' '.join(short) + ' ' + inject.random_words(rng, 30, vocab)
  (tmp_path / 'in').mkdir()
  h.write_jsonl(tmp_path / 'in' / 'a.jsonl', docs)
  result = command.prepare(flags(tmp_path / 'in', tmp_path / 'out', eval_fraction=0.3,
                                 dedup=False))
  with gzip.open(tmp_path / 'out' / 'heldout' / '00000.jsonl.gz', 'rt') as f:
    aside = [json.loads(line) for line in f]
  assert [(r['id'], r['text']) for r in aside] == [(keys[i], docs[i]) for i in held]
  kept = {k for k, _ in read_output(tmp_path / 'out')}
  assert kept == set(keys) - {keys[i] for i in held} - {keys[train[0]]}
  assert result['contaminated']['by_reference'] == {'heldout': 1}
  assert result['heldout']['documents'] == len(held)


def test_a_dataset_is_read_as_the_trainer_streams_it(tmp_path):
  """--input=hub:NAME reads data.source=hub's rows under its keys: the held-out split is
  the one training on the dataset holds out, and tasks split the rows without repeats."""
  from data import sources

  rng = random.Random(2)
  vocab = inject.vocabulary(rng)
  docs = [inject.random_words(rng, 40, vocab) for _ in range(30)]
  for i in (3, 7, 11, 19, 25):
    docs[i] = inject.pii_line('email', i, rng) + docs[i]
  (tmp_path / 'ds').mkdir()
  h.write_jsonl(tmp_path / 'ds' / 'part0.jsonl', docs[:18], key='body')
  h.write_jsonl(tmp_path / 'ds' / 'part1.jsonl', docs[18:], key='body')
  name = str(tmp_path / 'ds')
  stream = list(sources.HubSource(name, '', 'train', 'body').rows(0, 0))
  assert sorted(t for _, t in stream) == sorted(docs)
  outputs = []
  for tasks in (1, 3):
    out = tmp_path / f'out{tasks}'
    result = command.prepare(flags(f'hub:{name}', out, text_key='body', eval_fraction=0.2,
                                   tasks=tasks, dedup=False))
    assert result['input']['documents'] == len(docs)
    assert result['input']['dataset'] == {'name': name, 'config': '', 'split': 'train'}
    outputs.append(read_output(out))
    aside = set()
    for f in sorted((out / 'heldout').iterdir()):
      with gzip.open(f, 'rt') as lines:
        aside |= {(r['id'], r['text']) for r in map(json.loads, lines)}
    held = {(k, t) for k, t in stream if split.is_heldout(k, 0.2)}  # Keys hold tmp_path.
    assert aside == held and 1 <= len(held) < 15
    assert result['pii']['email'] == sum('@' in t for _, t in set(stream) - held)
    assert {k for k, _ in outputs[-1]} == {k for k, _ in stream} - {k for k, _ in held}
  assert outputs[0] == outputs[1]


def _lines_corpus(folder, rng):
  """30 documents of 10 random lines; a 3-line block in every third (and alone in one
  more document), a 2-line pair in every fifth."""
  vocab = inject.vocabulary(rng)
  line = lambda: inject.random_words(rng, 8, vocab)  # noqa: E731
  block, pair = [line() for _ in range(3)], [line() for _ in range(2)]
  docs = []
  for i in range(30):
    body = [line() for _ in range(10)]
    for every, lines in ((3, block), (5, pair)):
      if i % every == 0:
        at = rng.randrange(len(body) + 1)
        body[at:at] = lines
    docs.append('\n'.join(body))
  docs.append('\n'.join(block))
  folder.mkdir()
  h.write_jsonl(folder / 'a.jsonl', docs[:15])
  h.write_jsonl(folder / 'b.jsonl', docs[15:])
  return docs, block, pair


def test_line_dedup_cuts_every_repeat_of_a_span_and_keeps_one(tmp_path):
  docs, block, pair = _lines_corpus(tmp_path / 'in', random.Random(3))
  result = command.prepare(flags(tmp_path / 'in', tmp_path / 'out', line_dedup=3, dedup=False,
                                 pii=False, tasks=2))
  out = dict(read_output(tmp_path / 'out'))
  lines = [line for text in out.values() for line in text.split('\n')]
  assert [lines.count(b) for b in block] == [1, 1, 1]  # 11 copies: the first one stays
  assert [lines.count(p) for p in pair] == [6, 6]  # shorter than a span: untouched
  # Every other line is still there, in its document's order.
  keys = [f'a.jsonl:{i}' for i in range(15)] + [f'b.jsonl:{i}' for i in range(16)]
  emptied = [k for k, d in zip(keys, docs) if k not in out]
  assert emptied == ['b.jsonl:15']  # the document that was only the block
  for key, doc in zip(keys, docs):
    if key in out:
      assert out[key].split('\n') == [x for x in doc.split('\n')
                                      if x not in block or out[key].count(x)]
  assert result['line_dedup'] == {'lines_removed': 30, 'documents_emptied': 1}
  assert result['stages'][-1]['removed'] == {'line duplicates': 1}
  assert result['output']['documents'] == len(docs) - 1


def test_near_duplicate_detection_follows_the_lsh_curve():
  # Hand-derivable: 1 - (1 - s^r)^b, and (b, r) spends at most the hash budget.
  assert minhash.candidate_probability(0.5, 2, 2) == pytest.approx(1 - 0.75**2)
  for threshold, hashes in ((0.7, 112), (0.5, 128), (0.9, 64)):
    b, r = minhash.bands_rows(threshold, hashes)
    assert b * r <= hashes
    grid = np.linspace(0, 1, 101)
    p = minhash.candidate_probability(grid, b, r)
    crossing = grid[np.argmax(p >= 0.5)]
    assert abs(crossing - threshold) < 0.08, (threshold, b, r, crossing)


def test_pii_rules_by_hand():
  text = ('mail maria@example.org, phone (555) 201-0042 or +44 20 7946 0958 or 555-201-0042; '
          'hosts 93.184.216.34 and 8.8.8.8')
  scrubbed, counts = pii.scrub(text)
  assert counts == {'email': 1, 'ip': 2, 'phone': 3}
  assert scrubbed == ('mail <EMAIL>, phone <PHONE> or <PHONE> or <PHONE>; hosts '
                      '<IP_ADDRESS> and <IP_ADDRESS>')
  # Not personal, or not a phone number: private addresses, versions, dates, number rows.
  kept = 'at 127.0.0.1, 10.0.0.2, 192.168.1.1; Python 3.10.12; 2024-01-15; x = 100 200 3000'
  assert pii.scrub(kept) == (kept, {'email': 0, 'ip': 0, 'phone': 0})


def test_code_filter_rules():
  from datatrove.data import Document

  f = CodeFilter()
  ok = 'def f(x):\n    return x + 1\n'
  assert f.filter(Document(text=ok, id='a')) is True
  assert f.filter(Document(text='x = 1\n' + 'y' * 1001, id='b')) == (False, 'code_long_line')
  assert f.filter(Document(text='# Generated by protoc. DO NOT EDIT.\n' + ok, id='c')) == (
      False, 'code_autogenerated')
  assert f.filter(Document(text='{[(<>)]};\n' * 5, id='d')) == (False, 'code_low_alnum')


@pytest.mark.parametrize('case', ['empty folder', 'bad line', 'not empty', 'overwrite other',
                                  'unknown filter', 'output holds input',
                                  'output inside input', 'bad task record',
                                  'negative line span', 'missing dataset',
                                  'dataset column', 'output inside dataset'])
def test_bad_input_is_refused_in_one_line(tmp_path, case):
  (tmp_path / 'in').mkdir()
  good = tmp_path / 'in' / 'a.jsonl'
  kw, expect = {}, ''
  out = tmp_path / 'out'
  if case == 'empty folder':
    expect = f'--input: {tmp_path / "in"} holds no input files'
  else:
    h.write_jsonl(good, ['some text here'] * 3)
  if case == 'bad line':
    (tmp_path / 'in' / 'b.jsonl').write_text('{"text": "fine"}\n{not json\n')
    expect = f'--input: {tmp_path / "in" / "b.jsonl"} line 2: not JSON'
  elif case in ('not empty', 'overwrite other'):
    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    kw = {'overwrite': case == 'overwrite other'}
    expect = ('is not empty and holds no earlier preparation' if kw['overwrite']
              else f'--output: {out} is not empty (pass --overwrite')
  elif case == 'unknown filter':
    kw, expect = {'filters': 'code,gopher'}, "--filters: unknown filter 'gopher'"
  elif case == 'output holds input':
    out = tmp_path
    expect = '--output: ' + str(tmp_path) + ' holds the input file'
  elif case == 'bad task record':
    tasks = tmp_path / 'tasks.jsonl'
    tasks.write_text('{"context": "a b", "choices": ["x", "y"], "label": 0}\n'
                     '{"context": "a b", "choices": ["x", "x"], "label": 0}\n')
    kw = {'decontaminate': str(tasks)}
    expect = f'--decontaminate: {tasks} line 2: "choices" must differ'
  elif case == 'negative line span':
    kw, expect = {'line_dedup': -1}, '--line_dedup: lines per span, at least 1, or 0 for off'
  elif case == 'output inside input':
    out = tmp_path / 'in' / 'prepared'
    expect = f'--output: {out} lies inside the input folder {tmp_path / "in"}'
  elif case == 'missing dataset':
    kw['input'] = f'hub:{tmp_path / "nowhere"}'
    expect = f"--input: cannot stream '{tmp_path / 'nowhere'}'"
  elif case == 'dataset column':
    kw.update(input=f'hub:{tmp_path / "in"}', text_key='body')
    expect = "--text_key: column 'body' not found"
  elif case == 'output inside dataset':
    kw['input'], out = f'hub:{tmp_path / "in"}', tmp_path / 'in' / 'prepared'
    expect = f'--output: {out} lies inside the input folder {tmp_path / "in"}'
  before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  with pytest.raises(ValueError) as e:
    command.prepare(flags(kw.pop('input', tmp_path / 'in'), out, **kw))
  assert expect in str(e.value)
  if case != 'bad line':  # That one fails inside the run, into its own (new) folder.
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before
  else:
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.slow
def test_script_says_one_line_and_exits_nonzero(tmp_path):
  (tmp_path / 'in').mkdir()
  proc = helpers.script('prepare_data.py', f'--input={tmp_path / "in"}',
                        f'--output={tmp_path / "out"}', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f'error: --input: {tmp_path / "in"} holds no input files (.jsonl.gz, .jsonl, .json.gz, '
      '.json, .parquet, .txt.gz, .txt)']


FAKE_SBATCH = r'''#!PYTHON
"""sbatch for one machine: runs each array task of the script now, in order."""
import os, re, subprocess, sys
args, script = sys.argv[1:-1], sys.argv[-1]
text = open(script).read()
log = os.environ['FAKE_SLURM_LOG']
n = len(os.listdir(log))
open(os.path.join(log, f'{n:02d}.sh'), 'w').write(' '.join(args) + '\n' + text)
env = dict(os.environ)
for a in args:
  if a.startswith('--export=ALL,'):
    env.update(kv.split('=', 1) for kv in a[len('--export=ALL,'):].split(','))
m = re.search(r'#SBATCH --array=(\d+)-(\d+)', text)
for i in range(int(m.group(1)), int(m.group(2)) + 1) if m else [None]:
  if i is not None:
    env['SLURM_ARRAY_TASK_ID'] = str(i)
  subprocess.run(['bash', script], env=env, check=True)
print(f'Submitted batch job {1000 + n}')
'''


@pytest.mark.slow
def test_slurm_executor_runs_its_jobs_in_order(prepared, tmp_path):
  """A stand-in sbatch runs each submitted array at once (srun runs its command): the
  jobs datatrove writes give the local executor's output."""
  root, corpus, tasks, _, result = prepared
  bin_dir, log = tmp_path / 'bin', tmp_path / 'jobs'
  bin_dir.mkdir(), log.mkdir()
  (bin_dir / 'sbatch').write_text(FAKE_SBATCH.replace('PYTHON', sys.executable))
  (bin_dir / 'srun').write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do case $1 in -n|-N|-c) '
                                'shift 2;; *) shift;; esac; done; exec "$@"\n')
  (bin_dir / 'scontrol').write_text('#!/bin/bash\necho localhost\n')
  for name in ('sbatch', 'srun', 'scontrol'):
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, 'FAKE_SLURM_LOG': str(log), 'SLURM_NODELIST': 'localhost',
         'PATH': f'{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ["PATH"]}'}
  proc = helpers.script('prepare_data.py', f'--input={corpus}', f'--output={tmp_path / "out"}',
                        f'--decontaminate={tasks}', '--tasks=2', '--filters=none',
                        '--eval_fraction=0', '--executor=slurm', '--slurm_partition=test',
                        env=env)
  submitted = json.loads(proc.stdout.strip().splitlines()[-1])
  assert submitted['submitted'] is True
  assert read_output(tmp_path / 'out') == read_output(root / 'out')
  jobs = [(log / name).read_text() for name in sorted(os.listdir(log))]
  stage_jobs = [j for j in jobs if 'launch_pickled_pipeline' in j]
  assert len(stage_jobs) == 5  # filter, buckets, clusters, output, report
  assert all('#SBATCH --partition=test' in j for j in stage_jobs)
  assert '--dependency' not in stage_jobs[0].splitlines()[0]
  assert all('--dependency=afterok:' in j.splitlines()[0] for j in stage_jobs[1:])
  with open(tmp_path / 'out' / 'report.json') as f:
    assert json.load(f)['output'] == result['output']
  assert not (tmp_path / 'out' / 'work').exists()
