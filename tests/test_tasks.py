"""Task evaluation (scripts/eval.py --task): task files, the metrics by hand, and the
scores against lm-evaluation-harness on the same exported model and data."""

import json
import random

import numpy as np
import pytest

from data import stdlib
from data.tasks.files import ChoiceRow, Example, choice_rows, choice_tokens, read_task, task_paths
from lm.eval import task_metrics, tasks
from tests.helpers import one_device_env, script


def _write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')
  return path


def _last_json(proc):
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- metrics, by hand -------------------------------------------------------------------


def test_predictions_pick_the_best_choice_and_the_best_per_character():
  loglik = [[-4.0, -6.0], [-3.0, -3.0], [-9.0, -2.0, -5.0]]
  choices = [['a', 'bbbb'], ['x', 'y'], ['aaa', 'b', 'cc']]
  raw, norm = task_metrics.predictions(loglik, choices)
  # Per character: -4/1 < -6/4 = -1.5, so the long choice wins; a tie goes to the first.
  assert raw == [0, 0, 1] and norm == [1, 0, 1]
  assert task_metrics.accuracy([1, 0, 2], raw) == pytest.approx(1 / 3)
  assert task_metrics.accuracy([1, 0, 2], norm) == pytest.approx(2 / 3)


def test_precision_recall_f1_and_confusion_by_hand():
  labels = [0, 0, 0, 1, 1, 2]
  predicted = [0, 0, 1, 1, 2, 2]
  counts = task_metrics.confusion_matrix(labels, predicted, 4)
  assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
  got = task_metrics.precision_recall_f1(counts)
  # Class 0: 2 of 2 predicted right, 2 of 3 found; class 1: 1/2, 1/2; class 2: 1/2, 1/1.
  assert got['precision'][:3] == pytest.approx([1, 1 / 2, 1 / 2])
  assert got['recall'][:3] == pytest.approx([2 / 3, 1 / 2, 1])
  assert got['f1'][:3] == pytest.approx([0.8, 0.5, 2 / 3])
  assert got['support'] == [3, 2, 1, 0]
  # Class 3 is neither a label nor a prediction: 0 everywhere, and not in the averages.
  assert (got['precision'][3], got['recall'][3], got['f1'][3]) == (0, 0, 0)
  assert got['macro_precision'] == pytest.approx(2 / 3)
  assert got['macro_recall'] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
  assert got['macro_f1'] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_metrics_agree_with_scikit_learn():
  sk = pytest.importorskip('sklearn.metrics')
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 200)
  predicted = np.where(rng.random(200) < 0.4, labels, rng.integers(0, 4, 200))  # never 4
  ours = task_metrics.precision_recall_f1(task_metrics.confusion_matrix(labels, predicted, 6))
  p, r, f, s = sk.precision_recall_fscore_support(labels, predicted, labels=range(6),
                                                  zero_division=0)
  np.testing.assert_allclose(ours['precision'], p)
  np.testing.assert_allclose(ours['recall'], r)
  np.testing.assert_allclose(ours['f1'], f)
  assert ours['support'] == s.tolist()
  macro = sk.precision_recall_fscore_support(labels, predicted, average='macro', zero_division=0)
  assert (ours['macro_precision'], ours['macro_recall'], ours['macro_f1']) == pytest.approx(
      macro[:3])
  np.testing.assert_array_equal(task_metrics.confusion_matrix(labels, predicted, 5),
                                sk.confusion_matrix(labels, predicted, labels=range(5)))


def test_task_scores_add_classes_only_when_every_example_offers_the_same_choices():
  loglik = [[-1.0, -2.0], [-3.0, -1.0], [-1.0, -5.0]]
  same = task_metrics.task_scores(loglik, [['yes', 'no']] * 3, [0, 1, 1])
  assert same['classes'] == ['yes', 'no'] and same['confusion'] == [[1, 0], [1, 1]]
  assert same['accuracy'] == pytest.approx(2 / 3) and same['examples'] == 3
  varied = task_metrics.task_scores(loglik, [['yes', 'no'], ['no', 'yes'], ['yes', 'no']],
                                    [0, 1, 1])
  assert 'classes' not in varied and 'f1' not in varied


# --- task files ---------------------------------------------------------------------------


@pytest.mark.parametrize('line, message', [
    ('{"context": "a", "choices": ["b"]', 'not JSON'),
    ('["a", ["b"], 0]', 'expected a JSON object'),
    ('{"context": "a", "choices": ["b"]}', 'missing key label'),
    ('{"context": "a", "choices": [], "label": 0}', '"choices" must be a non-empty list'),
    ('{"context": "a", "choices": ["b", ""], "label": 0}',
     '"choices" must be a non-empty list of strings; choice 1 is'),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}',
     r'"label" must index "choices" \(0 to 1\), got 2'),
    ('{"context": "a", "choices": ["b"], "label": true}',
     r'"label" must index "choices" \(0 to 0\), got True'),
    ('{"context": 3, "choices": ["b"], "label": 0}', '"context" must be a string, got int'),
    ('{"context": "a", "choices": [" 1", " 2", " 1"], "label": 0}',
     '"choices" must differ; choice 2 repeats choice 0, \' 1\''),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"context": "x", "choices": ["y"], "label": 0}\n\n' + line + '\n')
  with pytest.raises(ValueError, match=f'{path}:3: {message}'):
    read_task(str(path))


def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'{"context": "x", "choices": ["y"], "label": 0}\n'
                   b'{"context": "\xff\xfe", "choices": ["y"], "label": 0}\n')
  with pytest.raises(ValueError, match=f'^{path}:2: not UTF-8 text$'):
    read_task(str(path))


def test_task_paths_expand_globs_and_name_tasks_by_stem(tmp_path):
  for name in ('b.jsonl', 'a.jsonl', 'c.json'):
    (tmp_path / name).write_text('')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'a.jsonl').write_text('')
  assert task_paths(f'{tmp_path}/*.jsonl, {tmp_path}/c.json') == [
      ('a', f'{tmp_path}/a.jsonl'), ('b', f'{tmp_path}/b.jsonl'), ('c', f'{tmp_path}/c.json')]
  with pytest.raises(ValueError, match="two task files named 'a'"):
    task_paths(f'{tmp_path}/a.jsonl,{tmp_path}/sub/a.jsonl')
  with pytest.raises(ValueError, match='nope.*matched no files'):
    task_paths(f'{tmp_path}/nope*.jsonl')
  with pytest.raises(ValueError, match='no examples'):
    read_task(str(tmp_path / 'a.jsonl'))


def test_read_task_keeps_the_first_max_examples(tmp_path):
  path = _write(tmp_path / 't.jsonl', [{'context': str(i), 'choices': ['a'], 'label': 0}
                                       for i in range(5)])
  assert [ex.context for ex in read_task(str(path), max_examples=2)] == ['0', '1']
  assert len(read_task(str(path))) == 5


# --- tokens at the boundary, the window, the batches -----------------------------------


def test_trailing_whitespace_of_the_context_moves_to_the_choice(tok):
  ex = Example('def f():\n    x = ', ('1', 'None'), 0, 't:1')
  (context, one), (_, none) = choice_tokens(tok, ex)
  assert context == [tok.bos_id] + tok.encode('def f():\n    x =')
  assert one == ([tok.bos_id] + tok.encode('def f():\n    x = 1'))[len(context):]
  assert tok.decode(one) == ' 1' and tok.decode(none) == ' None'
  # No context: the choice follows BOS.
  (context, choice), = choice_tokens(tok, Example('', ('import os',), 0, 't:2'))
  assert (context, choice) == ([tok.bos_id], tok.encode('import os'))


def test_a_long_context_is_cut_from_the_left(tok):
  text = stdlib.read('json/decoder.py')[:3000]
  ex = Example(text, ('\n# end',), 0, 't:1')
  (context, choice), = choice_tokens(tok, ex)
  row, = choice_rows(tok, ex, 32)
  assert row == ChoiceRow((context + choice)[-33:], len(choice), True)
  short, = choice_rows(tok, Example('x', ('y',), 0, 't:2'), 32)
  assert short.tokens == [tok.bos_id] + tok.encode('xy') and not short.cut
  with pytest.raises(ValueError, match="t:1: choice 0 is .* longer than the model's window"):
    choice_rows(tok, Example('x', (text,), 0, 't:1'), 32)


def test_rows_are_batched_longest_first_in_a_few_padded_shapes():
  assert [tasks.bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  rows = [ChoiceRow(list(range(1, n + 1)), k, False)
          for n, k in ((5, 2), (40, 3), (3, 1), (20, 19), (65, 4))]
  batches = tasks.pack_rows(rows, batch_size=2, seq_len=64)
  # Longest first; a batch takes its first row's length, rounded up to a power of two, and
  # holds 2 * (64 // length) rows: 65 and 40 tokens (length 64), then 20, 5 and 3 (32).
  assert [index.tolist() for index, _ in batches] == [[4, 1], [3, 0, 2]]
  assert [batch.tokens.shape for _, (batch, _) in batches] == [(2, 65), (4, 33)]
  (tokens, *_), mask = batches[1][1]
  assert tokens[0, :20].tolist() == list(range(1, 21)) and not tokens[0, 20:].any()
  # Targets are tokens[1:]: row 1 (5 tokens, 2 scored) scores targets 2 and 3 (tokens 4, 5).
  assert mask[1].nonzero()[0].tolist() == [2, 3]
  assert mask[0].nonzero()[0].tolist() == list(range(19))  # All 19 targets of row 3.
  assert mask[2].nonzero()[0].tolist() == [1] and not mask[3].any()


# --- against lm-evaluation-harness --------------------------------------------------------

# Cases where a tokenisation or window rule would show: whitespace at the end of the
# context (spaces, a newline, indentation), no context, choices of several tokens, a choice
# with a leading space, words cut in the middle, non-ASCII text.
EDGE_CASES = [
    {'context': 'x = ', 'choices': ['1', 'None', '[]'], 'label': 1},
    {'context': 'def f():\n', 'choices': ['    pass', '    return 1\n'], 'label': 0},
    {'context': 'class A:\n    ', 'choices': ['pass', 'def __init__(self):'], 'label': 1},
    {'context': '', 'choices': ['import os', 'from . import x'], 'label': 0},
    {'context': 'for i in', 'choices': [' range(10):', ' []:', 'range'], 'label': 0},
    {'context': 'impo', 'choices': ['rt sys', 'se sys', 'rtlib'], 'label': 0},
    {'context': "s = 'caf", 'choices': ["\u00e9'", " \u2713 \U0001f600'"], 'label': 0},
    {'context': '# \u00fcber\t', 'choices': ['\n', 'x\t'], 'label': 0},
]
CLASSES = [' json', ' email', ' http', ' unittest']


def _next_text_examples(tok, n, seed=0):
  """Spans of stdlib files: the context ends anywhere (mid-word too), one choice is the
  text that follows, the others spans of other files as long. Contexts of up to 1,500
  characters exceed the 64-token window; choices stay within it."""
  rng = random.Random(seed)
  files = stdlib.list_files()
  out = []
  while len(out) < n:
    texts = [stdlib.read(p) for p in rng.sample(files, 3)]
    if min(map(len, texts)) < 2000:
      continue
    size, at = rng.choice([3, 12, 40, 120]), rng.randrange(100, 1800)
    context = texts[0][max(0, at - rng.choice([10, 60, 250, 1500])):at]
    spans = [texts[0][at:at + size]] + [t[at + 7:at + 7 + size] for t in texts[1:]]
    if ('\u2581' in context + ''.join(spans) or len(set(spans)) < 3
        or not all(s.strip() and len(tok.encode(s)) < 48 for s in spans)):
      continue
    label = rng.randrange(3)
    spans.insert(label, spans.pop(0))
    try:  # A choice merged whole into the context's last token: lm-eval refuses it too.
      choice_tokens(tok, Example(context, tuple(spans), label, ''))
    except ValueError:
      continue
    out.append({'context': context, 'choices': spans, 'label': label})
  return out


def _classify_examples():
  """One snippet of each of a few files of four packages; the choices are the packages."""
  out = []
  for label, package in enumerate(p.strip() for p in CLASSES):
    for path in [p for p in stdlib.list_files() if p.startswith(package + '/')][:4]:
      snippet = stdlib.read(path)[:200]
      out.append({'context': f'{snippet}\n# package:', 'choices': CLASSES, 'label': label})
  return out


def _lm_eval_yaml(name, data_file):
  # A local json dataset; target_delimiter "" so lm-eval scores the choice as written.
  return (f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
          f'    test: {data_file}\ntest_split: test\noutput_type: multiple_choice\n'
          'doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n'
          'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')


def _lm_eval_scores(model_dir, task_dir, names):
  """lm-eval's per-choice log-likelihoods and per-example acc and acc_norm, by task."""
  lm_eval = pytest.importorskip('lm_eval')
  pytest.importorskip('accelerate')
  from lm_eval.tasks import TaskManager

  out = lm_eval.simple_evaluate(
      model='hf', model_args={'pretrained': str(model_dir), 'dtype': 'float32',
                              'add_bos_token': True},
      tasks=names, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
      device='cpu', batch_size=16, log_samples=True, bootstrap_iters=0)
  scores = {}
  for name in names:
    samples = sorted(out['samples'][name], key=lambda s: s['doc_id'])
    scores[name] = {'loglik': [[r[0][0] for r in s['resps']] for s in samples],
                    'acc': [s['acc'] for s in samples],
                    'acc_norm': [s['acc_norm'] for s in samples],
                    'contexts': [s['arguments'][0][0] for s in samples]}
  return scores


@pytest.mark.slow
def test_scores_equal_lm_evaluation_harness(trained_run, tmp_path, tok):
  from lm.run.folder import load_run

  examples_by_task = {'next_text': EDGE_CASES + _next_text_examples(tok, 24),
                      'classify': _classify_examples()}
  for name, examples in examples_by_task.items():
    _write(tmp_path / f'{name}.jsonl', examples)
    (tmp_path / f'{name}.yaml').write_text(_lm_eval_yaml(name, tmp_path / f'{name}.jsonl'))
  hf_dir = tmp_path / 'hf'
  script('export_hf.py', f'--workdir={trained_run}', f'--out={hf_dir}', env=one_device_env())

  proc = script('eval.py', f'--workdir={trained_run}',
                f'--task={tmp_path}/next_text.jsonl,{tmp_path}/classify.jsonl')
  result = _last_json(proc)
  assert result['step'] == 2 and [r['task'] for r in result['tasks']] == list(examples_by_task)
  ours = {r['task']: r for r in result['tasks']}
  assert ours['next_text']['truncated'] > 5  # The window cuts some contexts.
  assert ours['classify']['classes'] == CLASSES and 'classes' not in ours['next_text']
  theirs = _lm_eval_scores(hf_dir, tmp_path, list(examples_by_task))

  scorer = tasks.RowScorer(load_run(str(trained_run)))
  worst = 0.0
  for name, examples in examples_by_task.items():
    lm, mine = theirs[name], ours[name]
    assert lm['contexts'] == [ex['context'] for ex in examples]  # Read as written.
    n = len(examples)
    assert mine['examples'] == n
    assert round(mine['accuracy'] * n) == sum(lm['acc'])
    assert round(mine['accuracy_norm'] * n) == sum(lm['acc_norm'])
    loglik, _ = tasks.score_examples(scorer, read_task(str(tmp_path / f'{name}.jsonl')))
    for a, b in zip(loglik, lm['loglik'], strict=True):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
      worst = max(worst, float(np.max(np.abs(np.subtract(a, b)))))
    raw, norm = task_metrics.predictions(loglik, [ex['choices'] for ex in examples])
    labels = [ex['label'] for ex in examples]
    assert [float(p == y) for p, y in zip(raw, labels)] == lm['acc']
    assert [float(p == y) for p, y in zip(norm, labels)] == lm['acc_norm']
  # The confusion matrix eval.py printed is that of lm-eval's own predictions.
  predicted = [int(np.argmax(ll)) for ll in theirs['classify']['loglik']]
  labels = [ex['label'] for ex in examples_by_task['classify']]
  assert ours['classify']['confusion'] == task_metrics.confusion_matrix(
      labels, predicted, len(CLASSES)).tolist()
  print(f'max |loglik ours - lm-eval| = {worst:.2e}')


@pytest.mark.slow
def test_eval_script_task_errors_are_one_line(trained_run, tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"context": "a", "choices": ["b"], "label": 0}\n'
                  '{"context": "a", "choices": ["b"], "label": 1}\n')
  for args, message in (
      ([f'--task={path}'], f'{path}:2: "label" must index "choices" (0 to 0), got 1'),
      ([f'--task={tmp_path}/none*.jsonl'], 'none*.jsonl'),
      ([f'--task={path}', '--max_tokens=5'], '--task cannot be combined'),
      (['--max_examples=5'], '--max_examples goes with --task')):
    proc = script('eval.py', f'--workdir={trained_run}', *args, check=False)
    assert proc.returncode == 1 and proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines


@pytest.mark.slow
def test_eval_script_scores_the_first_max_examples(trained_run, tmp_path):
  path = _write(tmp_path / 'yes_no.jsonl', [
      {'context': f'x = {i} == {j}  # ', 'choices': ['True', 'False'], 'label': int(i != j)}
      for i, j in ((1, 1), (1, 2), (3, 3), (4, 0), (5, 6))])
  proc = script('eval.py', f'--workdir={trained_run}', f'--task={path}', '--max_examples=4')
  result = _last_json(proc)
  assert {k: result[k] for k in ('step', 'task', 'examples', 'truncated', 'classes')} == {
      'step': 2, 'task': 'yes_no', 'examples': 4, 'truncated': 0, 'classes': ['True', 'False']}
  assert sum(map(sum, result['confusion'])) == 4 and result['support'] == [2, 2]
  assert 0 <= result['macro_f1'] <= 1
  assert proc.stdout.startswith('yes_no: accuracy=')
  assert "  'True': precision=" in proc.stdout
