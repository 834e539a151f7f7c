"""Tests of data/tasks/ (stdlib_maker, helpdesk, make) and scripts/make_tasks.py: tasks from
held-out stdlib files."""

import json
import os

import pytest

from data import stdlib
from data.config import DataConfig
from data.split import is_heldout
from data.tasks import helpdesk, make, stdlib_maker
from tests.helpers import script

FRACTION = 0.25  # Enough held-out files for the package task (0.01 is not: see below).
CFG = DataConfig(eval_fraction=FRACTION)


@pytest.fixture(scope='module')
def built():
  return make.build_tasks(CFG, next_line_examples=300, module_examples=16)


@pytest.fixture(scope='module')
def heldout():
  """key -> text of every held-out stdlib file, read directly rather than through the
  module under test."""
  return {k: stdlib.read(k) for k in stdlib.list_files() if is_heldout(k, FRACTION)}


def test_next_line_uses_heldout_text_only_and_the_true_line_is_at_its_label(built, heldout):
  examples = built[stdlib_maker.NEXT_LINE]
  assert len(examples) == 300
  for e in examples:
    assert all(is_heldout(k, FRACTION) for k in e.files)
    # The context and the true line are one verbatim slice of a held-out file.
    assert e.context + e.choices[e.label] in heldout[e.files[0]]
    wrong = [c for i, c in enumerate(e.choices) if i != e.label]
    own_lines = set(heldout[e.files[0]].split('\n'))
    for choice, key in zip(wrong, e.files[1:], strict=True):
      assert choice[1:] in heldout[key].split('\n')  # A real line of another file...
      assert choice[1:] not in own_lines  # ...found nowhere in the context's file.
  # Every position holds the true line about as often (chance stays 25%).
  counts = [sum(e.label == i for e in examples) for i in range(stdlib_maker.NUM_CHOICES)]
  assert min(counts) > 0.15 * len(examples), counts


def test_next_line_choices_are_fair(built):
  for e in built[stdlib_maker.NEXT_LINE]:
    assert len(e.choices) == stdlib_maker.NUM_CHOICES == len(set(e.choices))
    assert e.context.count('\n') >= 1 and not e.context[-1].isspace()
    assert e.context.strip() and not e.context.split('\n')[0].isspace()
    lines = [c[1:] for c in e.choices]
    assert all(c.startswith('\n') and '\n' not in c[1:] for c in e.choices)
    # No blank or trivial line, and neither indentation nor length tells them apart.
    assert all(len(s.strip()) >= 16 and sum(map(str.isalpha, s)) >= 8 for s in lines)
    indents = {len(s) - len(s.lstrip(' ')) for s in lines}
    assert len(indents) == 1
    true = len(lines[e.label])
    assert all(abs(len(s) - true) <= max(2, true // 10) for s in lines)


def test_module_tasks_split_by_file_with_the_same_choices(built, heldout):
  train, test = built[stdlib_maker.MODULE_TRAIN], built[stdlib_maker.MODULE_TEST]
  for examples in (train, test):
    assert {e.label for e in examples} == set(range(len(stdlib_maker.PACKAGES)))
    for e in examples:
      assert e.choices == stdlib_maker.CHOICES == tuple(' ' + p for p in stdlib_maker.PACKAGES)
      assert stdlib_maker.package_of(e.files[0]) == stdlib_maker.PACKAGES[e.label]
      assert is_heldout(e.files[0], FRACTION)
      assert e.context.endswith('\n# Package:')
      assert e.context[:-len(stdlib_maker.PROMPT)] in heldout[e.files[0]]
    per_class = [sum(e.label == i for e in examples) for i in range(len(stdlib_maker.PACKAGES))]
    assert max(per_class) == 16
  assert not {e.files[0] for e in train} & {e.files[0] for e in test}
  assert not {e.context for e in train} & {e.context for e in test}


def test_helpdesk_asks_both_questions_of_heldout_files_one_side_each(built, heldout):
  train, test = built[helpdesk.HELPDESK_TRAIN], built[helpdesk.HELPDESK_TEST]
  module = {name: {e.context[:-len(stdlib_maker.PROMPT)] for e in built[name]}
            for name in (stdlib_maker.MODULE_TRAIN, stdlib_maker.MODULE_TEST)}
  for examples, snippets in ((train, module[stdlib_maker.MODULE_TRAIN]),
                             (test, module[stdlib_maker.MODULE_TEST])):
    kinds = {'purpose': 0, 'package': 0}
    for e in examples:
      assert all(is_heldout(k, FRACTION) for k in e.files)
      assert len(set(e.choices)) == len(e.choices)
      assert all(c.startswith('\n') for c in e.choices) and not e.context[-1].isspace()
      if e.context.startswith(helpdesk.PACKAGE_QUESTION):
        kinds['package'] += 1
        snippet = e.context[len(helpdesk.PACKAGE_QUESTION):-len('\n```')]
        assert snippet in snippets and snippet in heldout[e.files[0]]
        assert e.choices[e.label] == (
            f'\nIt is from the {stdlib_maker.package_of(e.files[0])} package.')
      else:
        kinds['purpose'] += 1
        name = helpdesk.module_name(e.files[0])
        assert e.context == f'What is the {name} module for?'
        # Each answer is its own file's purpose, read from that file's docstring.
        answers = [helpdesk.purpose(heldout[k]) for k in e.files]
        assert e.choices[e.label] == '\n' + answers[0]
        assert sorted('\n' + a for a in answers) == sorted(e.choices)
    assert kinds['package'] == len(snippets) and kinds['purpose'] > 30, kinds
  sides = [{k for e in examples for k in e.files} for examples in (train, test)]
  assert not sides[0] & sides[1]  # No file, asked about or offered, on both sides.


def test_module_name_and_purpose():
  assert helpdesk.module_name('json/decoder.py') == 'json.decoder'
  assert helpdesk.module_name('json/__init__.py') == 'json'
  assert helpdesk.module_name('os.py') == 'os'
  purpose = helpdesk.purpose
  assert purpose('"""Tools for\n    working with lists.  More here.\n\nDetails."""\nx = 1\n') == (
      'Tools for working with lists.')
  assert purpose('"""Parse the command line options"""') == 'Parse the command line options.'
  assert purpose('"""Copyright 2001 by the authors of this file."""') is None
  assert purpose('"""Too short."""') is None
  assert purpose('x = 1\n"""Not a docstring, not the first statement."""') is None
  assert purpose('def broken(:\n  """Never parsed."""') is None


def test_heldout_documents_are_exactly_the_unseen_stdlib_files(heldout):
  training = {stdlib.read(k) for k in stdlib.list_files() if not is_heldout(k, FRACTION)}
  copies = {k for k, text in heldout.items() if text in training}
  assert copies  # The stdlib has a few files under two names: the rule below has teeth.
  expected = {k for k, text in heldout.items() if text.strip() and k not in copies}
  assert {k for k, _ in stdlib_maker.heldout_documents(CFG)} == expected


def test_package_of():
  cases = {
      'email/parser.py': 'email', 'email/mime/text.py': 'email',
      'test/test_email/test_email.py': 'email', 'idlelib/idle_test/test_run.py': 'idlelib',
      'test/test_importlib/import_/test_path.py': 'importlib', 'json/__init__.py': 'json',
      'test/test_json.py': None, 'test/support/__init__.py': None, 'os.py': None,
      'encodings/cp1252.py': None, 'test/test_jsonx/a.py': None, 'jsonx/a.py': None,
  }
  assert {k: stdlib_maker.package_of(k) for k in cases} == cases


def test_split_files_halves_each_package_by_length():
  lengths = [9000, 8000, 300, 200, 100]
  docs = [(f'{p}/m{i}.py', 'x' * n) for p in stdlib_maker.PACKAGES for i, n in enumerate(lengths)]
  for train, test in stdlib_maker.split_files(docs).values():
    assert len(test) == 2 and len(train) == 3
    assert not set(train) & set(test)
    # One of the two long files on each side, whichever the digest picks.
    assert sum(len(t) > 1000 for _, t in test) == 1
  one_json = [d for d in docs if not d[0].startswith('json/')] + [('json/m0.py', 'x')]
  with pytest.raises(ValueError, match=r'held out: asyncio 5, .* json 1, tkinter 5'):
    stdlib_maker.split_files(one_json)


def test_snippets_are_disjoint_verbatim_runs_of_lines():
  text = '\n'.join(f'    value_{i} = compute({i})' + ('\n' if i % 5 == 0 else '')
                   for i in range(200))
  text += '\n' + 'y' * 400 + '\n\n'  # A line too long for any snippet.
  cuts = stdlib_maker.snippets(text)
  assert len(cuts) > 10
  end = 0
  for s in cuts:
    assert len(s) <= 280 and s.strip() and s == s.strip('\n')
    assert sum(1 for line in s.split('\n') if line.strip()) >= 3
    start = text.index(s, end)  # Verbatim, in order, not overlapping the one before.
    end = start + len(s)
  assert 'y' * 400 not in ''.join(cuts)


def test_too_few_heldout_files_is_one_clear_error():
  with pytest.raises(ValueError, match=r'data.eval_fraction=0.01: .*held out: asyncio'):
    make.build_tasks(DataConfig(eval_fraction=0.01))
  with pytest.raises(ValueError, match="data.source='files' does not read the stdlib"):
    make.build_tasks(DataConfig(source='files', files='*.toml', eval_fraction=0.5))


@pytest.mark.slow
def test_script_writes_the_same_bytes_in_every_process(tmp_path):
  counts = {'next_line_examples': 40, 'module_examples': 4}
  # Another process with another string-hash salt: no order may depend on hash().
  proc = script('make_tasks.py', f'--out={tmp_path / "a"}',
                f'--config.data.eval_fraction={FRACTION}', '--next_line_examples=40',
                '--module_examples=4', env={**os.environ, 'PYTHONHASHSEED': '123'})
  summary = json.loads(proc.stdout.strip().split('\n')[-1])
  make.write_tasks(CFG, str(tmp_path / 'b'), **counts)
  names = ['stdlib_helpdesk_test.jsonl', 'stdlib_helpdesk_train.jsonl',
           'stdlib_module_test.jsonl', 'stdlib_module_train.jsonl', 'stdlib_next_line.jsonl']
  assert sorted(os.listdir(tmp_path / 'a')) == names
  for name in names:
    a = (tmp_path / 'a' / name).read_bytes()
    assert a == (tmp_path / 'b' / name).read_bytes(), name
    records = [json.loads(line) for line in a.decode('ascii').splitlines()]
    assert all(set(r) == {'context', 'choices', 'label'} for r in records)
    assert all(0 <= r['label'] < len(r['choices']) for r in records)
    listed = next(t for t in summary['tasks'] if t['task'] + '.jsonl' == name)
    assert listed['examples'] == len(records)
  assert summary['eval_fraction'] == FRACTION
  assert summary['tasks'][0]['examples'] == 40
  assert summary['tasks'][1]['per_class'] == dict.fromkeys(stdlib_maker.PACKAGES, 4)


@pytest.mark.slow
def test_script_refuses_with_one_line(tmp_path):
  proc = script('make_tasks.py', f'--out={tmp_path}', '--config.data.eval_fraction=0.01',
                check=False)
  assert proc.returncode == 1
  assert proc.stderr.count('\n') == 1 and 'raise data.eval_fraction' in proc.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_script_never_overwrites_task_files_and_names_a_file_given_as_out(tmp_path):
  args = ('--next_line_examples=5', '--module_examples=2')
  script('make_tasks.py', f'--out={tmp_path / "tasks"}', *args)
  made = {p.name: p.read_bytes() for p in (tmp_path / 'tasks').iterdir()}
  (tmp_path / 'tasks' / 'stdlib_next_line.jsonl').write_text('my edits\n')
  again = script('make_tasks.py', f'--out={tmp_path / "tasks"}', *args, check=False)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines() == [
      f'error: --out: {tmp_path}/tasks/stdlib_next_line.jsonl exists; refusing to '
      'overwrite task files (choose another --out, or remove them)']
  assert (tmp_path / 'tasks' / 'stdlib_next_line.jsonl').read_text() == 'my edits\n'
  assert {p.name for p in (tmp_path / 'tasks').iterdir()} == set(made)
  (tmp_path / 'a_file').write_text('x')
  proc = script('make_tasks.py', f'--out={tmp_path / "a_file"}', *args, check=False)
  assert proc.stderr.strip().splitlines() == [
      f'error: --out: {tmp_path}/a_file is a file, not a folder']
  assert (tmp_path / 'a_file').read_text() == 'x'
