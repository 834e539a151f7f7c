"""Writers of outputs on a disk that refuses them: one line naming the path, exit 1.

Root ignores permission bits, so a site hook plays the read-only disk: under the folder
READ_ONLY names, making a folder or opening a file to write fails as EROFS would.
"""

import os

import pytest

from tests.helpers import script

HOOK = '''import builtins, errno, io, os
_root = os.environ["READ_ONLY"]
def _refuse(path):
  raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
_mkdir, _open = os.mkdir, io.open
def mkdir(path, *args, **kwargs):
  if str(path).startswith(_root):
    _refuse(path)
  return _mkdir(path, *args, **kwargs)
def open_(file, mode="r", *args, **kwargs):
  writes = set(mode) & set("wax+")
  if writes and isinstance(file, (str, os.PathLike)) and str(file).startswith(_root):
    _refuse(file)
  return _open(file, mode, *args, **kwargs)
os.mkdir, builtins.open, io.open = mkdir, open_, open_
'''


@pytest.mark.slow
def test_plots_tasks_and_sweeps_on_a_read_only_disk_are_one_line(tmp_path, tokenizer):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(HOOK)
  read_only = tmp_path / 'ro'
  (read_only / 'tasks').mkdir(parents=True)  # An existing folder: the files themselves fail.
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text('{"step": 1, "loss": 5.0}\n')
  env = {**os.environ, 'PYTHONPATH': str(site), 'READ_ONLY': str(read_only)}
  cases = [
      (('plot.py', str(run), f'--out={read_only}/loss.png'), f'{read_only}/loss.png'),
      (('make_tasks.py', f'--out={read_only}/tasks', '--next_line_examples=5',
        '--module_examples=2'), f'{read_only}/tasks/stdlib_next_line.jsonl.tmp'),
      (('sweep.py', '--config=configs/tiny.py', f'--out={read_only}/sweep',
        '--grid=model.d_model=32', f'--config.data.tokenizer={tokenizer}'),
       f'{read_only}/sweep'),
  ]
  for args, path in cases:
    proc = script(*args, env=env, check=False)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines() == [
        f"error: [Errno 30] Read-only file system: '{path}'"], (args, proc.stderr[-2000:])
  assert os.listdir(read_only) == ['tasks'] and not os.listdir(read_only / 'tasks')
