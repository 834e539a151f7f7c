"""Every test runs on the CPU with 8 forced host devices, so meshes can be tested here."""

import atexit
import fcntl
import os
import pathlib
import shutil
import tempfile


def _session_dir(variable: str, prefix: str) -> None:
  """A temporary folder in `variable` for this session and the processes it starts (xdist
  workers, scripts inherit it); the process that made it removes it at exit."""
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], True)


# Must be set before jax is imported anywhere. The tests' programs are small, so compiling
# them costs more than running them: LLVM's -O0 (XLA's backend optimisation level 0) cuts
# a third to two fifths of the time of the test files tried, and changes no program's
# meaning. Subprocesses inherit both flags.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
# Many tests (and their subprocesses, which inherit this) compile the same small models:
# a persistent compilation cache shared by the session compiles each only once.
_session_dir('JAX_COMPILATION_CACHE_DIR', 'lm-test-jax-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# `datasets` reads these when it is first imported, by whichever test module comes first:
# its cache out of ~, and never the network.
_session_dir('HF_DATASETS_CACHE', 'lm-test-hf-')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'


import pytest  # noqa: E402  (after the environment above is set)


def _built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """A folder `build` fills once per test session, shared by the xdist workers (their
  temporary folders lie side by side): the first to arrive builds it under a lock, the
  others wait and read it. Deterministic builds only; never changed by a test."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  folder, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # A build that failed half-way.
      folder.mkdir()
      build(folder)
      done.touch()
  return folder


@pytest.fixture(scope='session')
def tokenizer(tmp_path_factory) -> str:
  """Path of one small (512-piece) tokenizer trained on ~1 MB of the stdlib, shared by
  every test that needs a real tokenizer but not a particular one."""
  from data import stdlib
  from data.tokenizer import train_tokenizer

  def build(folder):
    train_tokenizer((stdlib.read(p) for p in stdlib.list_files()), 512,
                    str(folder / 'tok.model'), max_bytes=1 << 20)

  return str(_built_once(tmp_path_factory, 'tok', build) / 'tok.model')


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, tokenizer):
  """A tiny run (GQA, untied, seq_len 64) trained for two steps on one device: the run
  that tests export (tests/test_hf.py) and score against lm-evaluation-harness
  (tests/test_tasks.py). Read, never changed. Its output projections start random, not at
  tiny's zero, so that two steps leave every weight of the exported blocks far from 0."""
  from tests.helpers import one_device_env, script

  def build(folder):
    script('train.py', '--config=configs/tiny.py',
           '--config.steps=2', '--config.model.vocab_size=512',
           f'--config.data.tokenizer={tokenizer}', f'--config.workdir={folder / "run"}',
           '--config.eval_every=0', '--config.seq_len=64',
           '--config.model.num_layers=2', '--config.model.d_model=128',
           '--config.model.d_ff=256', '--config.model.num_heads=4',
           '--config.model.num_kv_heads=2', '--config.model.tie_embeddings=false',
           '--config.data.eval_fraction=0', '--config.model.zero_init_out=false',
           env=one_device_env())

  return _built_once(tmp_path_factory, 'trained_run', build) / 'run'


# The data tests' shared inputs (tests/data_helpers.py builds them); read, never changed.


@pytest.fixture(scope='session')
def tok(tokenizer):
  from data.tokenizer import Tokenizer
  return Tokenizer(tokenizer)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  from tests import data_helpers
  return data_helpers.make_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='session')
def lopsided(tmp_path_factory):
  from tests import data_helpers
  return data_helpers.make_lopsided(tmp_path_factory.mktemp('lopsided'))
