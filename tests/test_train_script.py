"""scripts/train.py end to end, in subprocesses: a pulse, the run folder, resume, errors."""

import json
import os
import shutil

import pytest

from tests.helpers import read_metrics, script


def _train(workdir, tokenizer, *overrides, check=True):
  return script('train.py', '--config=configs/tiny.py', f'--config.workdir={workdir}',
                f'--config.data.tokenizer={tokenizer}', '--config.model.vocab_size=512',
                '--config.log_every=1', '--config.eval_batches=1',
                '--config.data.eval_fraction=0.05', *overrides, check=check)


WANDB = ('--config.wandb.project=lm-test', '--config.wandb.mode=offline')


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory, tokenizer):
  """(run folder, process) of the CLI's pulse: two steps of the tiny config, evaluated at
  the end, with the W&B mirror offline. Read, never changed: the tests that go on from
  it resume a copy."""
  workdir = tmp_path_factory.mktemp('two_steps') / 'run'
  return workdir, _train(workdir, tokenizer, '--config.steps=2', '--config.eval_every=2', *WANDB)


@pytest.mark.slow
def test_tiny_trains_two_steps_and_writes_the_run_folder(tmp_path, tokenizer, two_steps):
  workdir, proc = two_steps
  assert json.loads(proc.stdout.strip().splitlines()[-1])['step'] == 2
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl', 'tb'):
    assert (workdir / name).exists(), name
  assert '2' in os.listdir(workdir / 'checkpoints')
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['vocab_size'] == 512 and config['steps'] == 2
  lines = read_metrics(workdir)
  train = [m for m in lines if 'loss' in m]
  assert [m['step'] for m in train] == [1, 2]
  for m in train:
    assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu'} <= set(m)
    assert m['mfu'] is None  # no known peak on a CPU
  evals = [m for m in lines if 'eval_loss' in m]
  assert len(evals) == 1 and evals[0]['step'] == 2
  assert set(evals[0]) == {'step', 'eval_loss', 'eval_perplexity', 'eval_bits_per_byte'}
  # Before the first step, a header says what the run is about to do.
  out = proc.stdout.splitlines()
  first_step = next(i for i, line in enumerate(out) if line.startswith('step='))
  header = '\n'.join(out[:first_step])
  assert f'run folder: {workdir}' in header and 'start: new run' in header
  assert 'parameters' in header and 'tokens per step' in header and 'mesh' in header
  # Run again, the finished run resumes at its end: no step trained, nothing written twice.
  shutil.copytree(workdir, tmp_path / 'run')
  again = _train(tmp_path / 'run', tokenizer, '--config.steps=2', '--config.eval_every=2',
                 *WANDB)
  assert 'start: resumed from step 2' in again.stdout
  assert read_metrics(tmp_path / 'run') == lines


@pytest.mark.slow
def test_context_axis_trains_evaluates_and_samples(tmp_path, tokenizer):
  """Rows split 4 ways over `context` (2-way data on the 8 devices) through the CLI: the
  header shows the mesh, the run evaluates, and generate.py samples from its checkpoint.
  (That the split trains as whole rows do is tests/test_context.py's, in process.)"""
  workdir = tmp_path / 'run'
  proc = _train(workdir, tokenizer, '--config.steps=2', '--config.eval_every=2',
                '--config.mesh.context=4', '--config.seq_len=64', '--config.model.num_layers=1')
  header = proc.stdout.split('step=')[0]
  assert 'mesh data=2 x fsdp=1 x tensor=1 x expert=1 x context=4' in header, header
  lines = read_metrics(workdir)
  assert [m['step'] for m in lines if 'loss' in m] == [1, 2]
  evals = [m for m in lines if 'eval_loss' in m]
  assert len(evals) == 1 and evals[0]['step'] == 2
  sample = script('generate.py', f'--workdir={workdir}', '--prompt=def main(',
                  '--max_new_tokens=4', '--temperature=0')
  ids = json.loads(sample.stdout.strip().splitlines()[-1])['ids']
  assert 1 <= len(ids) <= 4


@pytest.mark.slow
def test_bad_value_exits_non_zero_with_one_line_naming_the_key(tmp_path, tokenizer):
  proc = _train(tmp_path / 'bad', tokenizer, '--config.model.num_kv_heads=3', check=False)
  assert proc.returncode != 0
  assert 'model.num_kv_heads' in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'bad' / 'checkpoints').exists()


@pytest.mark.slow
def test_unknown_key_fails_naming_it(tmp_path, tokenizer):
  proc = _train(tmp_path / 'bad', tokenizer, '--config.model.flash_attention=1', check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == [
      'error: unknown config key model.flash_attention (in --config.model.flash_attention)']


@pytest.mark.slow
def test_user_mistakes_are_one_line_each_and_write_nothing(tmp_path, tokenizer):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  cases = [
      (['--config=configs/no_such.py'], '--config: no such file: configs/no_such.py'),
      (['config.steps=20'], 'unexpected arguments: config.steps=20'),
      (['--config.optimizer.lr=-0.001'], 'optimizer.lr: must be positive (got -0.001)'),
      (['--config.optimizer.lr=0'], 'optimizer.lr: must be positive (got 0.0)'),
      ([f'--config.workdir={a_file}'], f'workdir: {a_file} is a file, not a folder'),
  ]
  for args, expected in cases:
    proc = script('train.py', '--config=configs/tiny.py', f'--config.workdir={tmp_path / "w"}',
                  f'--config.data.tokenizer={tokenizer}', '--config.model.vocab_size=512', *args,
                  check=False)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [f'error: {expected}'], (args, proc.stderr)
    assert not (tmp_path / 'w').exists(), args


@pytest.mark.slow
def test_wandb_offline_gets_the_records_and_a_resume_continues_the_same_run(tmp_path,
                                                                             tokenizer,
                                                                             two_steps):
  workdir = tmp_path / 'run'
  shutil.copytree(two_steps[0], workdir)
  run_id = (workdir / 'wandb_id').read_text().strip()
  _train(workdir, tokenizer, '--config.steps=3', *WANDB)  # resumes, same W&B run
  runs = sorted((workdir / 'wandb').glob(f'offline-run-*-{run_id}'))
  assert len(runs) == 2, os.listdir(workdir / 'wandb')
  first = (runs[0] / f'run-{run_id}.wandb').read_bytes()
  for key in (b'loss', b'grad_norm', b'eval_loss', b'eval_bits_per_byte', b'vocab_size'):
    assert key in first, key  # the records and the resolved config
  assert b'loss' in (runs[1] / f'run-{run_id}.wandb').read_bytes()
