"""Plain helpers the tests share (fixtures and the test environment are in conftest.py)."""

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
  """Runs a command in the repository, output captured; `check`: it must exit 0."""
  proc = subprocess.run(list(argv), cwd=REPO, env=None if env is None else dict(env),
                        capture_output=True, text=True, timeout=timeout, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def one_device_env() -> dict[str, str]:
  """This environment with XLA's forced host devices removed: one CPU device, for runs
  whose mesh is not under test (it compiles in half the time)."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  flags = [f for f in flags if 'force_host_platform_device_count' not in f]
  return {**os.environ, 'XLA_FLAGS': ' '.join(flags)}


def host_devices_env(devices: int) -> dict[str, str]:
  """This environment with `devices` forced host CPU devices instead of the session's 8,
  its other XLA flags kept."""
  env = one_device_env()
  flags = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
  return {**env, 'XLA_FLAGS': flags.strip()}


def script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  """`python scripts/NAME ARGS...` (see `run` for the keyword arguments)."""
  return run([sys.executable, os.path.join(REPO, 'scripts', name), *args], **kwargs)


def read_metrics(workdir) -> list[dict]:
  """Every record of RUN/metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def cached_decode(model, params, prompts, more):
  """Logits of `prompts` prefilled at once (left-padded), then of each column of `more`
  (B, N) fed one token at a time through the KV cache: (prefill, [N x (B, V)], padded
  prompt length)."""
  import functools

  import jax

  from lm.eval import sampling

  step = jax.jit(functools.partial(sampling.decode_step, model))
  tokens, positions = sampling.left_pad(prompts)
  p = tokens.shape[1]
  cache = sampling.init_cache(model, len(prompts), p + more.shape[1])
  prefill, cache = step(params, cache, tokens, positions)
  decoded = []
  for i in range(more.shape[1]):
    logits, cache = step(params, cache, more[:, i:i + 1], positions[:, -1:] + 1 + i)
    decoded.append(logits[:, 0])
  return prefill, decoded, p


# Faults for the tests that save: one process's disk full or read-only.


def with_file_size_limit(argv: Sequence[str], kib: int) -> list[str]:
  # Every write past `kib` KiB in one file fails with EFBIG, as on a full disk (Python
  # ignores SIGXFSZ, so the write fails instead of killing the process).
  return ['bash', '-c', f'ulimit -f {kib} && exec "$@"', 'bash', *argv]


def read_only_checkpoints(tmp_path) -> str:
  """A PYTHONPATH folder whose site hook fails making any Orbax temporary folder, as a
  read-only disk does (the folders are made by process 0).

  Root ignores permission bits, so the test cannot chmod its way to a read-only folder.
  """
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(
      'import errno, os\n'
      '_mkdir = os.mkdir\n'
      'def mkdir(path, *args, **kwargs):\n'
      '  if str(path).endswith(".orbax-checkpoint-tmp"):\n'
      '    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))\n'
      '  return _mkdir(path, *args, **kwargs)\n'
      'os.mkdir = mkdir\n')
  return str(site)
