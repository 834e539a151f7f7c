"""Several processes on one box (jax.distributed over loopback, gloo on the CPU).

`jax.distributed.initialize` is only ever called in fresh subprocesses, never here.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from lm.run.checkpoint import committed_steps
from tests.helpers import (
  REPO,
  host_devices_env,
  read_metrics,
  read_only_checkpoints,
  with_file_size_limit,
)

TRAIN = os.path.join(REPO, 'scripts', 'train.py')
SMALL = ('--config.model.vocab_size=512', '--config.model.num_layers=2',
         '--config.model.d_model=64', '--config.model.d_ff=128', '--config.seq_len=32',
         '--config.log_every=1', '--config.eval_every=0', '--config.data.eval_fraction=0',
         '--config.mesh.data=2', '--config.mesh.fsdp=-1')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  return {**host_devices_env(devices), 'JAX_PLATFORMS': 'cpu'}


def _args(workdir, tokenizer, steps, extra=()):
  return [sys.executable, TRAIN, '--config=configs/tiny.py', f'--config.workdir={workdir}',
          f'--config.data.tokenizer={tokenizer}', f'--config.steps={steps}', *SMALL, *extra]


def _launch(workdir, tokenizer, steps, processes, extra=(), fault=lambda i, argv, env: argv):
  """Starts `processes` processes that share 8 CPU devices between them.

  fault(i, argv, env): process i's command line, after it may change env in place."""
  port = _free_port()
  procs = []
  for i in range(processes):
    dist = (f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
            f'--process_id={i}', '--heartbeat_timeout=10') if processes > 1 else ()
    env = _env(8 // processes)
    argv = fault(i, _args(workdir, tokenizer, steps, extra) + list(dist), env)
    procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _wait(procs, timeout=400):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(workdir):
  return [(m['step'], m['loss']) for m in read_metrics(workdir) if 'loss' in m]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, tokenizer):
  """The reference: 1 process with 8 devices, 6 steps, checkpoints at 3 and 6."""
  workdir = tmp_path_factory.mktemp('one') / 'run'
  _wait(_launch(workdir, tokenizer, 6, 1, ('--config.checkpoint_every=3',)))
  return workdir


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, tokenizer):
  """The same run as `one_process`, by 2 processes with 4 devices each."""
  workdir = tmp_path_factory.mktemp('two') / 'run'
  outs = _wait(_launch(workdir, tokenizer, 6, 2, ('--config.checkpoint_every=3',)))
  return workdir, outs


@pytest.mark.slow
def test_two_processes_match_one(one_process, two_processes):
  workdir, outs = two_processes
  ref, got = _losses(one_process), _losses(workdir)
  assert [s for s, _ in got] == [s for s, _ in ref] == list(range(1, 7))
  for (_, a), (_, b) in zip(ref, got):
    assert b == pytest.approx(a, rel=1e-5)
  # Only process 0 prints metrics and the result (gloo's own connection lines aside).
  ours = lambda out: [line for line in out.splitlines() if line.startswith(('step=', '{'))]
  assert ours(outs[0][0]) and not ours(outs[1][0])


def _as_if_killed_after_step_3(src, dst):
  shutil.copytree(src, dst)
  shutil.rmtree(dst / 'checkpoints' / '6')
  (dst / 'metrics.jsonl').unlink()


@pytest.mark.slow
@pytest.mark.parametrize('saved_by,resumed_by', [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_process_count(tmp_path, tokenizer, one_process,
                                                        two_processes, saved_by, resumed_by):
  source = two_processes[0] if saved_by == 2 else one_process
  workdir = tmp_path / 'run'
  _as_if_killed_after_step_3(source, workdir)
  _wait(_launch(workdir, tokenizer, 6, resumed_by, ('--config.checkpoint_every=3',)))
  ref, got = dict(_losses(one_process)), dict(_losses(workdir))
  assert sorted(got) == [4, 5, 6]
  for step in (4, 5, 6):
    assert got[step] == pytest.approx(ref[step], rel=1e-5)


@pytest.mark.slow
def test_a_dead_process_ends_the_job(tmp_path, tokenizer):
  procs = _launch(tmp_path / 'dead', tokenizer, 100000, 2, ('--config.checkpoint_every=0',))
  metrics = tmp_path / 'dead' / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
    assert procs[1].poll() is None, procs[1].communicate()[1][-3000:]
    time.sleep(0.5)
  procs[1].kill()
  killed = time.time()
  try:
    procs[0].communicate(timeout=120)
  finally:
    procs[0].kill()
  assert procs[0].returncode not in (0, None)
  assert time.time() - killed < 120


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path, tokenizer):
  # A preemption notice reaches one host; JAX's preemption sync point makes every
  # process stop after the same step, save it together and exit cleanly.
  workdir = tmp_path / 'preempted'
  procs = _launch(workdir, tokenizer, 100000, 2, ('--config.checkpoint_every=0',))
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and len(_losses(workdir)) >= 2) and time.time() < deadline:
    for p in procs:
      assert p.poll() is None, p.communicate()[1][-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = _wait(procs, timeout=300)
  result = json.loads([line for line in outs[0][0].splitlines() if line.startswith('{')][-1])
  assert result['stopped_early'] is True
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps == [result['step']]
  assert _losses(workdir)[-1][0] == result['step']


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_moved_aside_once_by_two_processes(tmp_path, tokenizer,
                                                                   one_process, two_processes):
  # Both processes find step 6 unreadable, agree, and process 0 moves it aside; both
  # resume from step 3 and replay steps 4-6 as the reference ran them.
  workdir = tmp_path / 'run'
  shutil.copytree(two_processes[0], workdir)
  (workdir / 'metrics.jsonl').unlink()
  for path in (workdir / 'checkpoints' / '6' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  _wait(_launch(workdir, tokenizer, 6, 2, ('--config.checkpoint_every=3',)))
  assert os.listdir(workdir / 'checkpoints.corrupt') == ['6']
  ref, got = dict(_losses(one_process)), dict(_losses(workdir))
  assert sorted(got) == [4, 5, 6]
  for step in (4, 5, 6):
    assert got[step] == pytest.approx(ref[step], rel=1e-5)


def _read_only_on_process_0(tmp_path):
  site = read_only_checkpoints(tmp_path)

  def fault(i, argv, env):
    if i == 0:  # Process 0 makes the step's folders.
      env['PYTHONPATH'] = site
    return argv
  return fault, 0, 'Read-only file system'


def _full_disk_on_process_1(tmp_path):
  # Process 1 writes its own shards of the state; every file past 64 KiB fails there.
  return (lambda i, argv, env: with_file_size_limit(argv, 64) if i == 1 else argv), 1, \
      'File too large'


@pytest.mark.slow
@pytest.mark.parametrize('broken', [_read_only_on_process_0, _full_disk_on_process_1])
def test_a_save_failing_on_one_process_stops_every_process_at_the_same_step(
    tmp_path, tokenizer, broken):
  # Without an agreement the others wait at Orbax's barriers for ten minutes, while the
  # failed process's own commit thread waits at the next one.
  fault, process, why = broken(tmp_path)
  workdir = tmp_path / 'run'
  procs = _launch(workdir, tokenizer, 100000, 2, ('--config.checkpoint_every=10',), fault)
  ended = []
  deadline = time.monotonic() + 300
  while len(ended) < 2 and time.monotonic() < deadline:
    ended += [(time.monotonic(), i) for i, p in enumerate(procs)
              if p.poll() is not None and i not in [j for _, j in ended]]
    time.sleep(0.1)
  for p in procs:
    p.kill()
  errs = [p.communicate()[1] for p in procs]
  assert len(ended) == 2, ('still running after 300 s', [e[-2000:] for e in errs])
  assert ended[1][0] - ended[0][0] < 10, ended  # within seconds of each other
  lines = [e.strip().splitlines() for e in errs]
  for p, err, out in zip(procs, errs, lines):
    assert p.returncode == 1 and len(out) == 1, err[-3000:]  # one line, no traceback
  assert lines[0] == lines[1], lines  # the failing process's message, on both
  message = lines[0][0]
  assert message.startswith(f'error: could not save the checkpoint of step 10 in '
                            f'{workdir}/checkpoints: process {process}: '), message
  assert why in message, message
  stopped = int(message.rsplit('stopped after step ', 1)[1])
  assert 10 < stopped <= 13, message  # noticed at once, not steps later
  logged = [s for s, _ in _losses(workdir)]
  assert logged == list(range(1, stopped)), logged  # every step up to the stop
  assert committed_steps(str(workdir)) == []
