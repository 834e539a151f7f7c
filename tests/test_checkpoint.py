"""Checkpoints you can trust: resume bit for bit after SIGTERM or SIGKILL, keep-N, corrupt
checkpoints moved aside, incompatible resumes refused, resharding, fine-tuning, NaN steps.

One uninterrupted run (`straight`, in-process) is the reference. Interrupted runs must
reproduce its loss at every step exactly; subprocesses are used only where a process
must die. A persistent compilation cache makes every run after the first cheap.
"""

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from optax.contrib import MuonState

from configs import tiny
from data import stdlib
from data.batch import Batch
from data.tokenizer import train_tokenizer
from lm.config import parse
from lm.model.params import param_axes
from lm.model.transformer import Transformer
from lm.optim.optimizer import make_optimizer, schedule
from lm.run.checkpoint import Checkpointer, CorruptCheckpoint, committed_steps
from lm.run.folder import RunFolder, load_run
from lm.sharding import AxisRules, batch_sharding
from lm.train import resume, trainer
from lm.train.step import abstract_state, init_state, jit_train_step, make_train_step, step_parts
from tests.helpers import (
  REPO,
  host_devices_env,
  read_metrics,
  read_only_checkpoints,
  run,
  with_file_size_limit,
)

TRAIN = os.path.join(REPO, 'scripts', 'train.py')
STEPS = 60
# A small model on an 8-way FSDP mesh; dropout on, so a resume that lost the RNG shows.
COMMON = {
    'steps': STEPS, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 10,
    'keep_checkpoints': 3, 'seq_len': 32, 'data.eval_fraction': 0.0, 'mesh.data': 1,
    'mesh.fsdp': -1, 'model.vocab_size': 512, 'model.num_layers': 2, 'model.d_model': 64,
    'model.d_ff': 128, 'model.dropout': 0.1,
}
_CACHE_KEYS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
               'jax_persistent_cache_min_entry_size_bytes')


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """Every run here compiles the same few programs: compile them once, here and in children."""
  path = str(tmp_path_factory.mktemp('jax_cache'))
  saved = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
  for k, v in zip(_CACHE_KEYS, (path, 0, 0)):
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _overrides(workdir, tokenizer, extra):
  return {**COMMON, 'workdir': str(workdir), 'data.tokenizer': tokenizer, **(extra or {})}


def _config(workdir, tokenizer, extra=None) -> ml_collections.ConfigDict:
  config = tiny.get_config()
  for key, value in _overrides(workdir, tokenizer, extra).items():
    *parents, name = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  config.lock()
  return config


def _argv(workdir, tokenizer, extra=None) -> list[str]:
  return [sys.executable, TRAIN, '--config=configs/tiny.py'] + [
      f'--config.{k}={v}' for k, v in _overrides(workdir, tokenizer, extra).items()]


def _env(compile_cache, devices=8):
  return {**host_devices_env(devices), 'JAX_COMPILATION_CACHE_DIR': compile_cache,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def _run(argv, env, *, check=True):
  return run(argv, env=env, check=check)


def _losses(workdir) -> list[tuple[int, float | None]]:
  """(step, loss) of every train line, in the order written."""
  return [(m['step'], m['loss']) for m in read_metrics(workdir) if 'loss' in m]


def _assert_same_losses(workdir, reference: dict[int, float], steps=range(1, STEPS + 1)):
  """Every logged loss equals the reference's at that step, bit for bit; all steps logged."""
  got = _losses(workdir)
  assert {s for s, _ in got} == set(steps)
  wrong = [(s, loss, reference[s]) for s, loss in got if loss != reference[s]]
  assert not wrong, f'{len(wrong)} of {len(got)} losses differ, first {wrong[:3]}'


@pytest.fixture(scope='module')
def straight(tmp_path_factory, tokenizer):
  """The uninterrupted reference run, keeping every checkpoint for the tests to clone."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  trainer.train(_config(workdir, tokenizer, {'keep_checkpoints': 100}), handle_signals=False)
  losses = dict(_losses(workdir))
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert committed_steps(str(workdir)) == [10, 20, 30, 40, 50, 60]
  return workdir, losses


def _clone(straight_dir, dest, step):
  """The reference run as if it had died right after committing checkpoint `step`."""
  shutil.copytree(straight_dir, dest)
  for name in os.listdir(dest / 'checkpoints'):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(dest / 'checkpoints' / name)
  lines = (dest / 'metrics.jsonl').read_text().splitlines(keepends=True)
  (dest / 'metrics.jsonl').write_text(
      ''.join(line for line in lines if json.loads(line).get('step', 0) <= step))
  return dest


def _wait_until(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if condition():
      return
    time.sleep(0.01)
  raise TimeoutError('the run did not get there in time')


def _has_lines(workdir, n):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    return sum(1 for _ in f) >= n


# Interrupted runs resume bit for bit.


def _kill_during_a_save(proc, checkpoints) -> bool:
  """SIGKILLs `proc` while it writes a checkpoint: an Orbax temporary folder newer than it."""
  started = time.time_ns()
  while proc.poll() is None:
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    for name in names:
      try:
        fresh = os.stat(os.path.join(checkpoints, name)).st_ctime_ns > started
      except FileNotFoundError:  # committed (renamed) meanwhile
        continue
      if '.orbax-checkpoint-tmp' in name and fresh:
        proc.kill()
        proc.communicate()
        return True
    time.sleep(0.001)
  return False


@pytest.mark.slow
def test_killed_three_ways_the_run_still_matches_an_uninterrupted_one_bit_for_bit(
    tmp_path, tokenizer, straight, compile_cache):
  """SIGKILL at a random moment, SIGKILL during an async save, SIGTERM, then the end."""
  workdir = tmp_path / 'run'
  argv, env = _argv(workdir, tokenizer), _env(compile_cache)
  popen = lambda: subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  proc = popen()  # 1: SIGKILL at a random moment after the first checkpoint
  _wait_until(lambda: (workdir / 'checkpoints' / '10').is_dir(), proc)
  time.sleep(random.uniform(0, 0.3))
  proc.kill()
  proc.communicate()
  proc = popen()  # 2: SIGKILL while a checkpoint is being written
  assert _kill_during_a_save(proc, workdir / 'checkpoints'), 'finished before any save'
  lines = len(_losses(workdir))
  proc = popen()  # 3: SIGTERM: finish the step, save, exit 0
  _wait_until(lambda: _has_lines(workdir, lines + 3), proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result['stopped_early'] and result['step'] < STEPS
  assert result['step'] in committed_steps(str(workdir))  # saved and committed
  _run(argv, env)  # 4: to the end
  _assert_same_losses(workdir, straight[1])
  assert [s for s, _ in _losses(workdir)] == list(range(1, STEPS + 1))  # no step twice
  assert committed_steps(str(workdir)) == [40, 50, 60]  # keep_checkpoints=3
  assert not [n for n in os.listdir(workdir / 'checkpoints') if 'tmp' in n]


@pytest.mark.slow
@pytest.mark.parametrize('drop', ['opt_state', 'rng'])
def test_a_resume_that_loses_state_fails_the_comparison(tmp_path, tokenizer, straight,
                                                         monkeypatch, drop):
  """Control: restoring with a fresh optimizer state or another RNG changes the losses."""
  workdir = _clone(straight[0], tmp_path / 'run', 30)
  restore = Checkpointer.restore

  def lossy_restore(self, step, abstract):
    saved = restore(self, step, abstract)
    state = saved.state
    if drop == 'opt_state':
      fresh = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), x.sharding),
                           state.opt_state)
      return saved._replace(state=state.replace(opt_state=fresh))
    return saved._replace(state=state.replace(rng=jax.random.fold_in(state.rng, 1)))

  monkeypatch.setattr(Checkpointer, 'restore', lossy_restore)
  trainer.train(_config(workdir, tokenizer), handle_signals=False)
  with pytest.raises(AssertionError, match='losses differ'):
    _assert_same_losses(workdir, straight[1])


# Keeping, corruption, refusal.


def test_keeps_the_last_n_and_never_fewer_than_two(tmp_path):
  state = {'w': jnp.arange(8.0)}
  for keep, expected in ((1, [3, 4]), (3, [2, 3, 4])):
    ckpt = Checkpointer(str(tmp_path / f'keep{keep}'), keep=keep)
    for step in range(1, 5):
      ckpt.save(step, state, {'position': step})
    ckpt.wait()
    assert ckpt.all_steps() == expected
    ckpt.close()
  with pytest.raises(ValueError, match='keep_checkpoints'):
    parse(_config(tmp_path, '', {'keep_checkpoints': 0}))


def test_a_save_over_an_unfinished_one_of_the_same_step_commits(tmp_path, caplog):
  # A run killed mid-save leaves RUN/checkpoints/<step>.orbax-checkpoint-tmp; resumed
  # from an earlier step, it saves <step> again. Orbax clears the stale folder from
  # several threads at once, which can fail and lose the save; it is cleared first.
  ckpt = Checkpointer(str(tmp_path / 'run'))
  state = {'w': jnp.arange(8.0)}
  ckpt.save(1, state, {'position': 1})
  ckpt.wait()
  stale = os.path.join(ckpt.directory, '2.orbax-checkpoint-tmp')
  shutil.copytree(ckpt.step_dir(1), stale)
  for item in ('state', 'data'):
    os.rename(os.path.join(stale, item), os.path.join(stale, f'{item}.orbax-checkpoint-tmp'))
  with caplog.at_level(logging.WARNING):
    ckpt.save(2, {'w': jnp.arange(8.0) + 1}, {'position': 2})
    ckpt.wait()
  assert 'an unfinished save of step 2' in caplog.text
  assert ckpt.all_steps() == [1, 2]
  assert not [p for p in os.listdir(ckpt.directory) if 'tmp' in p]
  restored, data, interval = ckpt.restore(2, {'w': jax.ShapeDtypeStruct((8,), jnp.float32)})
  np.testing.assert_array_equal(restored['w'], np.arange(8.0) + 1)
  assert data == {'position': 2} and interval is None  # none given to save
  ckpt.close()


def test_corrupt_latest_is_moved_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, tokenizer, straight, caplog):
  workdir = _clone(straight[0], tmp_path / 'run', 40)
  latest = workdir / 'checkpoints' / '40'
  damaged = sorted(p.relative_to(latest) for p in latest.rglob('*') if p.is_file())
  for path in (latest / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')  # e.g. a disk that filled up
  # A save killed before its commit leaves a temporary folder: it must be ignored.
  (workdir / 'checkpoints' / '50.orbax-checkpoint-tmp').mkdir()
  (workdir / 'checkpoints' / '50.orbax-checkpoint-tmp' / 'junk').write_text('x')
  with caplog.at_level('WARNING'):
    trainer.train(_config(workdir, tokenizer), handle_signals=False)
  assert any(str(latest) in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records)
  moved = workdir / 'checkpoints.corrupt' / '40'
  assert sorted(p.relative_to(moved) for p in moved.rglob('*') if p.is_file()) == damaged
  # Steps 31-40 were replayed from checkpoint 30 and match the reference bit for bit;
  # metrics.jsonl keeps one record per step, the replayed one.
  assert [s for s, _ in _losses(workdir)] == list(range(1, STEPS + 1))
  _assert_same_losses(workdir, straight[1])


def _tree_snapshot(root):
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob('*'))}


@pytest.mark.slow
def test_changed_d_model_is_refused_before_anything_is_written(tmp_path, tokenizer, straight,
                                                               compile_cache):
  workdir = _clone(straight[0], tmp_path / 'run', 20)
  before = _tree_snapshot(workdir)
  proc = _run(_argv(workdir, tokenizer, {'model.d_model': 48}), _env(compile_cache),
              check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert 'model.d_model: 64 in checkpoint, 48 now' in last, proc.stderr[-2000:]
  assert _tree_snapshot(workdir) == before


def test_vocabulary_and_tokenizer_changes_are_named_runtime_keys_are_not(
    tmp_path, tokenizer, straight):
  workdir = _clone(straight[0], tmp_path / 'run', 10)
  other = str(tmp_path / 'other.model')
  train_tokenizer((stdlib.read(p) for p in stdlib.list_files()[:40]), 400, other,
                  max_bytes=1 << 16)
  with pytest.raises(ValueError, match='model.vocab_size: 512 in checkpoint, 1024 now'):
    resume.preflight(parse(_config(workdir, tokenizer, {'model.vocab_size': 1024})))
  with pytest.raises(ValueError, match=r'tokenizer.sha256: .*tokenizer.vocab_size: 512 in '
                                       r'checkpoint, 400 now'):
    resume.preflight(parse(_config(workdir, other)))
  # How the same parameters are computed may change on resume.
  resume.preflight(parse(_config(workdir, tokenizer, {'model.remat': True,
                                                      'model.dropout': 0.0,
                                                      'loss.chunk': 8})))


# Resharding.


@pytest.mark.slow
def test_a_resume_in_the_middle_of_a_log_interval_logs_what_the_whole_run_logs(tmp_path,
                                                                              tokenizer):
  # Lines every 4 steps, checkpoints every 3: the run resumed from step 6 must log at 8
  # the means over steps 5-8, not 7-8. Only the throughput, a clock, may differ.
  extra = {'steps': 8, 'log_every': 4, 'checkpoint_every': 3, 'keep_checkpoints': 100}
  trainer.train(_config(tmp_path / 'whole', tokenizer, extra), handle_signals=False)
  workdir = _clone(tmp_path / 'whole', tmp_path / 'resumed', 6)
  trainer.train(_config(workdir, tokenizer, extra), handle_signals=False)
  clock = {'tokens_per_sec', 'mfu', 'mfu_causal', 'tflops_per_sec'}
  lines = [[{k: v for k, v in m.items() if k not in clock} for m in read_metrics(d)]
           for d in (tmp_path / 'whole', workdir)]
  assert [m['step'] for m in lines[0]] == [4, 8]
  assert lines[1] == lines[0]


@pytest.mark.slow
def test_restores_on_four_devices_and_continues(tmp_path, tokenizer, straight, compile_cache):
  workdir = _clone(straight[0], tmp_path / 'run', 50)
  _run(_argv(workdir, tokenizer), _env(compile_cache, devices=4))
  _assert_close_after_resume(workdir, straight[1], 50)


def _assert_close_after_resume(workdir, reference, start):
  """Another mesh sums in another order: equal losses up to float rounding."""
  got = dict(_losses(workdir))
  assert sorted(got) == list(range(1, STEPS + 1))
  resumed = np.array([got[s] for s in range(start + 1, STEPS + 1)])
  expected = np.array([reference[s] for s in range(start + 1, STEPS + 1)])
  np.testing.assert_allclose(resumed[:3], expected[:3], rtol=1e-5)
  np.testing.assert_allclose(resumed, expected, rtol=1e-3)


def _built(config):
  exp = trainer.build(config)
  exp.close()
  return exp


@pytest.mark.slow
def test_restores_onto_a_tensor_parallel_mesh_and_continues(tmp_path, tokenizer, straight):
  fsdp = _built(_config(_clone(straight[0], tmp_path / 'fsdp', 50), tokenizer))
  tensor = {'mesh.fsdp': 2, 'mesh.tensor': 4}
  workdir = _clone(straight[0], tmp_path / 'tensor', 50)
  tp = _built(_config(workdir, tokenizer, tensor))
  assert tp.start_step == 50 and dict(tp.rules.mesh.shape)['tensor'] == 4
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(tp.state.params)]
  assert any('tensor' in s for s in specs) and not any('tensor' in str(x.sharding.spec)
                                                       for x in jax.tree.leaves(fsdp.state))
  for a, b in zip(jax.tree.leaves(fsdp.state), jax.tree.leaves(tp.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trainer.train(_config(workdir, tokenizer, tensor), handle_signals=False)
  _assert_close_after_resume(workdir, straight[1], 50)


# Fine-tuning.


@pytest.mark.slow
def test_init_from_takes_the_parameters_with_a_fresh_optimizer_on_other_data(
    tmp_path, tokenizer, straight):
  source = straight[0]
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i, path in enumerate(stdlib.list_files()[:30]):
    (corpus / f'{i}.txt').write_text(stdlib.read(path))
  workdir = tmp_path / 'finetune'
  config = _config(workdir, '', {'init_from': str(source / 'checkpoints' / '30'),
                                 'data.source': 'files', 'data.files': str(corpus / '*.txt'),
                                 'checkpoint_every': 0})
  exp = _built(config)
  assert exp.start_step == 0 and int(exp.state.step) == 0
  reader = Checkpointer(str(source), read_only=True)
  expected = reader.restore_params(30, exp.state.params)
  reader.close()
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(exp.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A fresh optimizer: its state as init makes it (zero moments; Muon's constant
  # Newton-Schulz coefficients aside, nothing carried over from the source run).
  fresh = step_parts(exp.cfgs, exp.rules).tx.init(exp.state.params)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(exp.state.opt_state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With no tokenizer named, the source run's is the one that gives its ids their meaning.
  assert (workdir / 'tokenizer.model').read_bytes() == (source / 'tokenizer.model').read_bytes()
  trainer.train(config, handle_signals=False)
  assert committed_steps(str(workdir)) == [STEPS]
  assert _built(config).start_step == STEPS  # Its own checkpoint now wins over init_from.
  # A run folder means its latest checkpoint.
  assert resume.resolve_init_from(str(source)) == resume.Source(str(source), 60)


def test_init_from_a_bad_path_or_another_shape_is_one_clear_error(tmp_path, tokenizer,
                                                                  straight):
  workdir = tmp_path / 'finetune'
  with pytest.raises(ValueError, match='init_from: no such folder: /no/such/run'):
    trainer.train(_config(workdir, tokenizer, {'init_from': '/no/such/run'}),
                  handle_signals=False)
  with pytest.raises(ValueError, match='init_from: no checkpoint in'):
    trainer.train(_config(workdir, tokenizer, {'init_from': str(tmp_path)}),
                  handle_signals=False)
  with pytest.raises(ValueError, match='model.d_ff: 128 in checkpoint, 256 now'):
    trainer.train(_config(workdir, tokenizer, {'init_from': str(straight[0]),
                                               'model.d_ff': 256}), handle_signals=False)
  assert not workdir.exists()


# Non-finite steps.


def test_a_non_finite_step_is_skipped_without_touching_the_state(tmp_path, tokenizer):
  cfgs = parse(_config(tmp_path, tokenizer))
  rules = AxisRules.from_config(cfgs.mesh)
  model = Transformer(cfgs.model, rules)
  tx = make_optimizer(cfgs.optimizer, STEPS, param_axes(model))
  state, shardings = init_state(model, tx, cfgs.run.seq_len, rules, 0)
  shape = (cfgs.run.batch_size, cfgs.run.seq_len + 1)
  step = jit_train_step(make_train_step(model, tx, schedule(cfgs.optimizer, STEPS), rules=rules),
                        shardings, rules, shape)
  good = np.random.default_rng(0).integers(4, 512, shape, dtype=np.int32)
  bad = good.copy()
  bad[0, 0] = 512  # Out of the vocabulary: its embedding, and so the loss, is NaN.
  put = lambda x: Batch(jax.device_put(x, batch_sharding(rules, shape)))
  before = jax.device_get(state)
  state, metrics = step(state, put(bad))
  after = jax.device_get(state)
  assert int(metrics['nonfinite']) == 1 and int(after.step) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  state, metrics = step(state, put(good))
  assert int(metrics['nonfinite']) == 0 and np.isfinite(float(metrics['loss']))
  # A finite step does update (the moments; the first learning rate is 0 in warmup).
  changed = jax.device_get(state.opt_state)
  assert any((a != b).any() for a, b in zip(jax.tree.leaves(after.opt_state),
                                            jax.tree.leaves(changed)))


def test_too_many_non_finite_steps_in_a_row_abort_without_saving(tmp_path, tokenizer,
                                                                  straight, monkeypatch):
  workdir = _clone(straight[0], tmp_path / 'run', 30)
  restore = Checkpointer.restore

  def poisoned_restore(self, step, abstract):  # as if the parameters had gone bad
    saved = restore(self, step, abstract)
    params = jax.tree.map(lambda x: x * jnp.nan, saved.state.params)
    return saved._replace(state=saved.state.replace(params=params))

  monkeypatch.setattr(Checkpointer, 'restore', poisoned_restore)
  config = _config(workdir, tokenizer, {'max_nonfinite_steps': 3, 'checkpoint_every': 1})
  with pytest.raises(trainer.TrainingAborted, match='3 non-finite steps in a row'):
    trainer.train(config, handle_signals=False)
  assert committed_steps(str(workdir)) == [10, 20, 30]  # nothing after the bad steps
  replayed = [m for m in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
              if m['step'] > 30]
  assert replayed and all(m['skipped_steps'] == 1 and m['loss'] is None for m in replayed)


# Saves that fail, flipped bits, a refused resume, two trainers in one folder.


def _assert_stopped_at_the_failed_save(proc, workdir, elapsed):
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: could not save the checkpoint of step 20 in '
                         f'{workdir}/checkpoints: '), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'Event loop is closed' not in proc.stderr, proc.stderr[-3000:]
  # Orbax's threads, waiting for a folder that was never made, would hold the exit 300 s.
  assert elapsed < 200, (elapsed, proc.stderr[-3000:])
  assert committed_steps(str(workdir)) == [10]  # the good checkpoint stays
  logged = [s for s, _ in _losses(workdir)]
  assert logged == list(range(1, logged[-1] + 1)) and logged[-1] >= 20, logged


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_resuming_later_is_bit_exact(
    tmp_path, tokenizer, straight, compile_cache):
  workdir = _clone(straight[0], tmp_path / 'run', 10)
  start = time.monotonic()
  proc = _run(with_file_size_limit(_argv(workdir, tokenizer), 128), _env(compile_cache),
              check=False)
  _assert_stopped_at_the_failed_save(proc, workdir, time.monotonic() - start)
  assert 'File too large' in proc.stderr, proc.stderr[-3000:]
  _run(_argv(workdir, tokenizer), _env(compile_cache))  # space freed: on to the end
  _assert_same_losses(workdir, straight[1])
  assert [s for s, _ in _losses(workdir)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_stops_the_run_at_once(tmp_path, tokenizer, straight,
                                                            compile_cache):
  workdir = _clone(straight[0], tmp_path / 'run', 10)
  env = {**_env(compile_cache), 'PYTHONPATH': read_only_checkpoints(tmp_path)}
  start = time.monotonic()
  proc = _run(_argv(workdir, tokenizer), env, check=False)
  _assert_stopped_at_the_failed_save(proc, workdir, time.monotonic() - start)
  assert 'Read-only file system' in proc.stderr, proc.stderr[-3000:]


def _flip_bit(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x10
  path.write_bytes(bytes(data))


def _largest_state_file(step_dir):
  return max((p for p in (step_dir / 'state').rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


def _flip_a_bit_only_the_checksums_catch(workdir, step, abstract):
  """Flips one bit of the step's largest state file that the storage layer reads without
  complaint, so that only the checksums can refuse it. Where a flip lands (array bytes or
  TensorStore's own) depends on the file's layout, which changes with the state's tree."""
  target = _largest_state_file(workdir / 'checkpoints' / str(step))
  size = target.stat().st_size
  for offset in range(size // 2, size, size // 64):
    _flip_bit(target, offset)
    reader = Checkpointer(str(workdir), read_only=True)
    try:
      reader.restore(step, abstract)
    except CorruptCheckpoint as e:
      if 'checksum mismatch' in str(e):
        return
    except Exception:  # noqa: BLE001  TensorStore refused it: not the flip wanted here.
      pass
    finally:
      reader.close()
    _flip_bit(target, offset)  # Undone: read as it was, or refused before the checksums.
  pytest.fail(f'no flipped bit in the second half of {target} reached the checksums')


def test_a_flipped_bit_is_caught_by_the_checksums_and_the_run_falls_back(
    tmp_path, tokenizer, straight, caplog):
  workdir = _clone(straight[0], tmp_path / 'run', 40)
  cfgs = parse(_config(workdir, tokenizer))
  rules = AxisRules.from_config(cfgs.mesh)
  parts = step_parts(cfgs, rules)
  abstract = abstract_state(parts.model, parts.tx, cfgs.run.seq_len, rules)
  _flip_a_bit_only_the_checksums_catch(workdir, 40, abstract)
  with caplog.at_level('WARNING'):
    trainer.train(_config(workdir, tokenizer), handle_signals=False)
  warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and 'checksum mismatch' in warnings[0], warnings
  assert (workdir / 'checkpoints.corrupt' / '40').is_dir()
  _assert_same_losses(workdir, straight[1])


def _assert_same_arrays(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_flipped_bits_anywhere_in_the_arrays_never_restore_silently(tmp_path, tokenizer,
                                                                    straight):
  """Each flip is refused, or (it hit bytes no array is read from) restores exactly."""
  exp = _built(_config(_clone(straight[0], tmp_path / 'ref', 30), tokenizer))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          exp.state)
  target = _largest_state_file(straight[0] / 'checkpoints' / '30')
  size = target.stat().st_size
  offsets = range(size // 16, size, size // 8)
  refused = 0
  for n, offset in enumerate(offsets):
    workdir = _clone(straight[0], tmp_path / f'run{n}', 30)
    _flip_bit(workdir / target.relative_to(straight[0]), offset)
    reader = Checkpointer(str(workdir), read_only=True)
    try:
      state = reader.restore(30, abstract).state
    except Exception:  # noqa: BLE001  Refused: as good as unreadable, never wrong.
      refused += 1
    else:
      _assert_same_arrays(state, exp.state)
    # Evaluation reads the parameters alone: refused, naming the checkpoint, or exact.
    try:
      params = load_run(str(workdir), 30).params
    except ValueError as e:
      assert f'{workdir}/checkpoints/30' in str(e)
    else:
      _assert_same_arrays(params, exp.state.params)
  assert refused >= len(offsets) // 2  # Array data fills most of the file: flips do hit.


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, tokenizer, straight):
  workdir = _clone(straight[0], tmp_path / 'run', 20)
  before = {k: v for k, v in _tree_snapshot(workdir).items() if k != '.lock'}
  for change in ({'data.eval_fraction': 0.3}, {'seed': 7}):
    with pytest.raises(ValueError):
      trainer.train(_config(workdir, tokenizer, change), handle_signals=False)
    assert {k: v for k, v in _tree_snapshot(workdir).items() if k != '.lock'} == before
  # Evaluation reads the settings a checkpoint was trained with, whatever config.json says.
  saved = json.loads((workdir / 'config.json').read_text())
  (workdir / 'config.json').write_text(json.dumps({**saved, 'seed': 7}))
  assert RunFolder(str(workdir)).checkpoint_config(20).run.seed == saved['seed']


@pytest.mark.slow
def test_a_second_trainer_in_the_same_folder_is_refused_until_the_first_is_gone(
    tmp_path, tokenizer, straight):
  workdir = _clone(straight[0], tmp_path / 'run', 60)
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from lm.run.lock import RunLock; '
       'RunLock(sys.argv[1]).acquire(); print("held", flush=True); sys.stdin.read()',
       str(workdir)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  before = _tree_snapshot(workdir)
  with pytest.raises(ValueError, match=rf'{workdir} is in use by another trainer '
                                       rf'\(pid {holder.pid} on {socket.gethostname()}'):
    trainer.train(_config(workdir, tokenizer), handle_signals=False)
  assert _tree_snapshot(workdir) == before
  holder.kill()  # A killed holder leaves no stale lock behind.
  holder.communicate()
  result = trainer.train(_config(workdir, tokenizer), handle_signals=False)
  assert result['step'] == STEPS


# Muon.


def _zero_muon_momentum(opt_state):
  is_muon = lambda x: isinstance(x, MuonState)
  zero = lambda x: jax.device_put(jnp.zeros_like(x), x.sharding)
  return jax.tree.map(lambda s: s._replace(mu=jax.tree.map(zero, s.mu)) if is_muon(s) else s,
                      opt_state, is_leaf=is_muon)


@pytest.mark.slow
def test_muon_resumes_bit_for_bit_and_needs_its_momentum(tmp_path, tokenizer, monkeypatch):
  """Muon's momentum and both branches' step counts are saved: resumed at step 10, the run
  matches an uninterrupted one; resumed as AdamW, it is refused. Control: zeroing the
  restored momentum shows."""
  muon = {'optimizer.name': 'muon', 'model.scan_layers': True, 'steps': 20}
  reference = tmp_path / 'straight'
  trainer.train(_config(reference, tokenizer, {**muon, 'keep_checkpoints': 100}),
                handle_signals=False)
  losses = dict(_losses(reference))
  workdir = _clone(reference, tmp_path / 'run', 10)
  trainer.train(_config(workdir, tokenizer, muon), handle_signals=False)
  _assert_same_losses(workdir, losses, steps=range(1, 21))
  # Resumed as AdamW, its state would not restore: refused up front, nothing moved aside.
  before = _tree_snapshot(workdir)
  with pytest.raises(ValueError, match='optimizer.name: "muon" in checkpoint, "adamw" now'):
    trainer.train(_config(workdir, tokenizer, {**muon, 'optimizer.name': 'adamw'}),
                  handle_signals=False)
  assert _tree_snapshot(workdir) == before

  restore = Checkpointer.restore

  def lossy_restore(self, step, abstract):
    saved = restore(self, step, abstract)
    return saved._replace(state=saved.state.replace(
        opt_state=_zero_muon_momentum(saved.state.opt_state)))

  monkeypatch.setattr(Checkpointer, 'restore', lossy_restore)
  workdir = _clone(reference, tmp_path / 'lossy', 10)
  trainer.train(_config(workdir, tokenizer, muon), handle_signals=False)
  with pytest.raises(AssertionError, match='losses differ'):
    _assert_same_losses(workdir, losses, steps=range(1, 21))


def test_the_orbax_members_closed_after_a_failed_save_still_exist(tmp_path):
  """Checkpointer.close() reaches into Orbax's CheckpointManager by these private names
  when a save failed; an Orbax that renames one would leave its threads running and the
  process hanging at exit, so this fails first, naming it."""
  from lm.run.checkpoint import ORBAX_MANAGER_PARTS

  ckpt = Checkpointer(str(tmp_path / 'run'))
  try:
    for part in ORBAX_MANAGER_PARTS:
      assert callable(getattr(getattr(ckpt._manager, part, None), 'close', None)), (
          f'orbax CheckpointManager has no {part}.close(): update ORBAX_MANAGER_PARTS')
  finally:
    ckpt.close()
