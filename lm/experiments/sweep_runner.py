"""Runs a sweep's points as train.py processes, several at once where devices allow.

Each point is its own process, so it resumes, evaluates and exports like any run, and a
point that fails (out of memory, diverged) costs only itself. Devices per process:

- GPUs (`--gpus`, else CUDA_VISIBLE_DEVICES, else `nvidia-smi`): the list is cut into
  `parallel` equal slices and each process sees one slice through CUDA_VISIBLE_DEVICES.
- Otherwise (a CPU): every process shares the cores; where XLA_FLAGS forces N host
  devices, each process gets N // parallel of them, so the total stays N.

Children start in their own session, so a Ctrl-C on the terminal reaches the sweep only;
the sweep's first SIGINT or SIGTERM starts no more points and sends one SIGTERM to each
running train.py, which saves and exits (a second one stops them unsaved, as for
train.py itself). On Linux a sweep that dies without a word (SIGKILL, out of memory)
sends that SIGTERM too, through the kernel's parent-death signal, so no point trains on
unwatched and holds its run folder from the next sweep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures

import ml_collections

from lm.experiments import sweep
from lm.experiments.sweep import Point, Spec


def say(line: str) -> None:
  print(line, flush=True)  # Progress lines as they happen, also into a pipe or a file.


_FORCED = re.compile(r'--xla_force_host_platform_device_count=(\d+)')


def visible_gpus(flag: str) -> list[str]:
  """GPU ids to share out: --gpus, else CUDA_VISIBLE_DEVICES, else nvidia-smi's list."""
  if flag:
    return [g.strip() for g in flag.split(',') if g.strip()]
  env = os.environ.get('CUDA_VISIBLE_DEVICES')
  if env is not None:
    return [g.strip() for g in env.split(',') if g.strip()]
  if not shutil.which('nvidia-smi'):
    return []
  try:
    proc = subprocess.run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'],
                          capture_output=True, text=True, timeout=30, check=True)
  except (OSError, subprocess.SubprocessError):
    return []
  return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def slot_envs(parallel: int, gpus: Sequence[str],
              base: Mapping[str, str]) -> list[dict[str, str]]:
  """The environment of each of `parallel` process slots (see the module docstring)."""
  if parallel < 1:
    raise ValueError(f'--parallel must be at least 1, got {parallel}')
  if parallel == 1:
    return [dict(base)]
  if gpus:
    if parallel > len(gpus):
      raise ValueError(f'--parallel={parallel} is more than the {len(gpus)} GPU(s) '
                       f'{",".join(gpus)}: one process needs at least one')
    per = len(gpus) // parallel
    return [{**base, 'CUDA_VISIBLE_DEVICES': ','.join(gpus[i * per:(i + 1) * per])}
            for i in range(parallel)]
  flags = base.get('XLA_FLAGS', '')
  forced = _FORCED.search(flags)
  if forced:
    each = max(1, int(forced.group(1)) // parallel)
    flags = _FORCED.sub(f'--xla_force_host_platform_device_count={each}', flags)
    return [{**base, 'XLA_FLAGS': flags} for _ in range(parallel)]
  return [dict(base) for _ in range(parallel)]


def point_argv(argv: Sequence[str]) -> list[str]:
  """`argv` (a point's train.py command) started so that it stops when the sweep dies
  (lm/experiments/die_with_parent.py; Linux only, elsewhere `argv` as it is)."""
  if not sys.platform.startswith('linux'):
    return list(argv)
  launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'die_with_parent.py')
  return [sys.executable, launcher, str(os.getpid()), *argv]


def _last_error(log_path: str) -> str:
  """train.py's one-line error from the end of a point's log, else its last line."""
  try:
    with open(log_path, encoding='utf-8', errors='replace') as f:
      lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
  except OSError:
    return ''
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or [''])[-1]


class Runner:
  """Runs points in `len(envs)` slots; stops starting new ones on the first signal."""

  def __init__(self, spec: Spec, out: str, envs: Sequence[Mapping[str, str]],
               say: Callable[[str], None] = say) -> None:
    self.spec, self.out, self.say = spec, out, say
    self.slots: list[Mapping[str, str]] = list(envs)
    self.lock = threading.Lock()
    self.running: set[subprocess.Popen] = set()
    self.stopping = False
    self.failed: list[str] = []
    self.on_done: Callable[[], None] = lambda: None  # Called after every point, locked.
    os.makedirs(os.path.join(out, 'logs'), exist_ok=True)

  def on_signal(self, signum, frame) -> None:
    """First signal: no new points, SIGTERM to the running ones (they save and exit)."""
    with self.lock:
      again, self.stopping = self.stopping, True
      procs = list(self.running)
    self.say('signal again to stop unsaved' if again else
             f'stopping: {len(procs)} running point(s) save and exit; '
             'the same command continues the sweep')
    for proc in procs:
      proc.send_signal(signal.SIGTERM)

  def run(self, todo: Sequence[Point]) -> None:
    """Runs every point in `todo`; the main thread waits, so signals reach `on_signal`."""
    previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      with futures.ThreadPoolExecutor(max_workers=len(self.slots)) as pool:
        pending = {pool.submit(self._run_point, p, i, len(todo)) for i, p in enumerate(todo)}
        while pending:
          _, pending = futures.wait(pending, timeout=0.5)
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)

  def _run_point(self, point: Point, i: int, n: int) -> None:
    with self.lock:
      if self.stopping:
        return
      env = self.slots.pop()
    try:
      self._train(point, env, f'[{i + 1}/{n}] {point.name}')
    finally:
      with self.lock:
        self.slots.append(env)

  def _train(self, point: Point, env: Mapping[str, str], label: str) -> None:
    log_path = os.path.join(self.out, 'logs', f'{point.name}.log')
    self.say(f'{label}: training ({log_path})')
    start = time.time()
    with open(log_path, 'a', encoding='utf-8') as log:
      proc = subprocess.Popen(point_argv(sweep.child_argv(self.spec, point)), env=dict(env),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      with self.lock:
        self.running.add(proc)
      rc = proc.wait()
    wall = time.time() - start
    with self.lock:
      self.running.discard(proc)
      with open(os.path.join(self.out, 'attempts.jsonl'), 'a', encoding='utf-8') as f:
        f.write(json.dumps({'name': point.name, 'rc': rc, 'wall_s': round(wall, 2),
                            'start': round(start, 1)}) + '\n')
      loss = sweep.final_eval_loss(point) if rc == 0 else None
      drift = sweep.config_drift(point) if loss is not None else None
      if drift:  # The config file was edited after the sweep began.
        self.failed.append(point.name)
        self.say(f'{label}: trained another config than the sweep began with ({drift})')
      elif loss is not None:
        self.say(f'{label}: done in {wall:.1f} s, eval loss {loss:.4f}')
      elif rc == 0 or self.stopping:
        self.say(f'{label}: stopped after {wall:.1f} s, not finished')
      else:
        self.failed.append(point.name)
        self.say(f'{label}: failed (exit {rc}) after {wall:.1f} s: '
                 f'{_last_error(log_path)}')
      self.on_done()


def run_sweep(config: ml_collections.ConfigDict, spec: Spec, out: str, *, parallel: int = 1,
              gpus: str = '', x: str = '', say: Callable[[str], None] = say) -> int:
  """Trains every unfinished point, then writes results.jsonl, fit.json and the plots.

  Everything is checked (keys, values, every point's config, --x, --parallel, a
  different sweep already in `out`) before anything is written. Returns the exit code:
  1 if a point failed, else 0 (also when a signal stopped the sweep early).
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out: {out} is a file, not a folder')
  points = sweep.make_points(config, spec, out)
  x_key = sweep.pick_x(spec, x)
  envs = slot_envs(parallel, visible_gpus(gpus) if parallel > 1 else [], os.environ)
  sweep.check_spec(out, spec)
  for point in points:
    drift = sweep.config_drift(point)
    if drift:
      raise ValueError(f'{point.workdir} ran another config than {spec.config} gives now '
                       f'({drift}); restore the config, or give a new --out')
  todo = [p for p in points if sweep.final_eval_loss(p) is None]
  say(f'sweep: {len(points)} points; skipped {len(points) - len(todo)} finished; '
      f'{len(todo)} to train, {len(envs)} at a time')
  runner = Runner(spec, out, envs, say)
  runner.on_done = lambda: sweep.write_results(out, points)  # A current table after each point.
  runner.run(todo)
  rows = sweep.write_results(out, points)
  say(f'results: {os.path.join(out, "results.jsonl")} '
      f'({sum(r["status"] == "done" for r in rows)} of {len(rows)} points done)')
  for line in sweep.report(out, points, rows, spec, x_key):
    say(line)
  if runner.failed:
    say(f'{len(runner.failed)} point(s) failed: {", ".join(runner.failed)}; their logs are '
        f'in {os.path.join(out, "logs")}; the same command tries them again')
    return 1
  return 0
