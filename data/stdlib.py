"""The embedded default corpus: the Python standard library's own source files.

Every machine with Python has it, so the default config trains without a download.
"""

import functools
import os
import sysconfig

# Third-party code lives under these folders inside the stdlib tree; it is not ours.
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


@functools.lru_cache(maxsize=4)
def list_files(root: str | None = None) -> tuple[str, ...]:
  """Relative POSIX paths of the stdlib's .py files, sorted, so the order never varies."""
  root = root or stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        found.append(rel.replace(os.sep, '/'))
  return tuple(sorted(found))


def read(rel_path: str, root: str | None = None) -> str:
  """One file's text; a few test files are not UTF-8, so undecodable bytes become U+FFFD."""
  path = os.path.join(root or stdlib_root(), *rel_path.split('/'))
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()
