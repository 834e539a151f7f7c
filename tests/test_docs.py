"""Every command in README.md and docs/ names a script that exists, flags it defines and
config keys that configs/base.py declares, so the docs cannot drift from the code."""

import pathlib
import re
import shlex
import sys

import pytest

from tests.helpers import REPO, run

DOCS = [pathlib.Path(REPO) / 'README.md', *sorted((pathlib.Path(REPO) / 'docs').glob('*.md'))]


def _commands() -> list[tuple[str, list[str]]]:
  """(where, argv) of each `python scripts/NAME.py ...` line in a code block; lines ending
  in a backslash continue on the next."""
  out = []
  for path in DOCS:
    blocks = re.findall(r'```[a-z]*\n(.*?)```', path.read_text(encoding='utf-8'), re.S)
    for block in blocks:
      for line in block.replace('\\\n', ' ').splitlines():
        line = line.split(' #')[0]
        for m in re.finditer(r'python3? (scripts/\w+\.py)((?:\s+(?:--|[A-Z_]+=)\S+)*)', line):
          try:
            argv = shlex.split(m.group(2))
          except ValueError:  # A quote closed on a later line: read what is whole.
            argv = m.group(2).split()
          out.append((f'{path.name}: {m.group(0)[:60]}', [m.group(1), *argv]))
  return out


COMMANDS = _commands()


def test_the_docs_hold_commands():
  scripts = {argv[0] for _, argv in COMMANDS}
  assert {'scripts/train.py', 'scripts/eval.py', 'scripts/sweep.py'} <= scripts


@pytest.mark.slow
def test_every_documented_flag_and_config_key_exists():
  from configs import base

  keys = set(_flatten(base.get_config().to_dict()))
  helps = {}
  for where, (name, *args) in COMMANDS:
    assert (pathlib.Path(REPO) / name).is_file(), f'{where}: no {name}'
    if name not in helps:
      helps[name] = run([sys.executable, name, '--helpfull'], check=False).stdout
    for arg in args:
      if not arg.startswith('--'):
        continue
      flag = arg[2:].split('=')[0]
      if flag.startswith('config.'):
        key = flag[len('config.'):]
        assert key in keys or any(k.startswith(key + '.') for k in keys), (
            f'{where}: configs/base.py has no key {key}')
      elif flag not in ('help', 'helpfull'):
        assert re.search(rf'--(\[no\])?{re.escape(flag)}:', helps[name]), (
            f'{where}: {name} has no flag --{flag}')


def _flatten(d: dict, prefix: str = ''):
  for k, v in d.items():
    yield prefix + k
    if isinstance(v, dict):
      yield from _flatten(v, f'{prefix}{k}.')
