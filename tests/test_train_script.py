"""scripts/train.py end to end, in subprocesses: a pulse, the run folder, resume, errors."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, 'scripts', 'train.py')


def _train(workdir, tokenizer, *overrides, check=True):
  cmd = [sys.executable, TRAIN, '--config=configs/tiny.py', f'--config.workdir={workdir}',
         f'--config.data.tokenizer={tokenizer}', '--config.model.vocab_size=512',
         '--config.log_every=1', '--config.eval_batches=1', '--config.data.eval_fraction=0.05',
         *overrides]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_tiny_trains_two_steps_and_writes_the_run_folder(tmp_path, tokenizer):
  workdir = tmp_path / 'run'
  proc = _train(workdir, tokenizer, '--config.steps=2', '--config.eval_every=2')
  assert json.loads(proc.stdout.strip().splitlines()[-1])['step'] == 2
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl', 'tb'):
    assert (workdir / name).exists(), name
  assert '2' in os.listdir(workdir / 'checkpoints')
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['vocab_size'] == 512 and config['steps'] == 2
  lines = _metrics(workdir)
  train = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train] == [1, 2]
  for m in train:
    assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu'} <= set(m)
    assert m['mfu'] is None  # no known peak on a CPU
  evals = [m for m in lines if 'eval_loss' in m]
  assert len(evals) == 1 and evals[0]['step'] == 2
  assert set(evals[0]) == {'step', 'eval_loss', 'eval_perplexity', 'eval_bits_per_byte'}


def test_bad_value_exits_non_zero_with_one_line_naming_the_key(tmp_path, tokenizer):
  proc = _train(tmp_path / 'bad', tokenizer, '--config.model.num_kv_heads=3', check=False)
  assert proc.returncode != 0
  assert 'model.num_kv_heads' in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'bad' / 'checkpoints').exists()


def test_unknown_key_fails_naming_it(tmp_path, tokenizer):
  proc = _train(tmp_path / 'bad', tokenizer, '--config.model.flash_attention=1', check=False)
  assert proc.returncode != 0
  assert 'flash_attention' in proc.stderr
