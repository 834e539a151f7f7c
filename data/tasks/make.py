"""scripts/make_tasks.py's work: every stdlib task built from held-out files, and written.

  stdlib_next_line, stdlib_module_train/test   stdlib_maker.py
  stdlib_helpdesk_train/test                   helpdesk.py (fine-tuning data that also scores)
"""

import os
from collections.abc import Sequence
from typing import Any

from data.config import DataConfig
from data.tasks import helpdesk, stdlib_maker
from data.tasks.record import Example
from data.tasks.stdlib_maker import MODULE_TEST, MODULE_TRAIN, NEXT_LINE, PACKAGES

# Measured: at 0.25 every package has 3 or more held-out files on each side of the module
# split and 64 snippets or more on each side, on Python 3.11, 3.12 and 3.13; at 0.2 some
# have 2 files and under 20 snippets, and at 0.15 tkinter has 1 file.
_RAISE = 'raise data.eval_fraction (0.25 is enough, e.g. --config.data.eval_fraction=0.25)'
_CLASSES = (MODULE_TRAIN, MODULE_TEST)  # Same choices throughout.


def _write(path: str, examples: Sequence[Example]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8', newline='\n') as f:
    f.writelines(e.to_json() + '\n' for e in examples)
  os.replace(tmp, path)  # A reader never sees half a file.


def _summary(name: str, path: str, examples: Sequence[Example], classes: bool) -> dict[str, Any]:
  out: dict[str, Any] = {'task': name, 'path': path, 'examples': len(examples),
                         'files': len({e.files[0] for e in examples})}
  if classes:
    out['per_class'] = {p: sum(e.label == i for e in examples) for i, p in enumerate(PACKAGES)}
    out['files_per_class'] = {p: len({e.files[0] for e in examples if e.label == i})
                              for i, p in enumerate(PACKAGES)}
  return out


def build_tasks(cfg: DataConfig, *, next_line_examples: int = 1000,
                module_examples: int = 64) -> dict[str, list[Example]]:
  """Task name -> examples, from the stdlib files `cfg` holds out; ValueError says why a
  task cannot be built (naming data.eval_fraction where more held-out files would help)."""
  if next_line_examples < 1 or module_examples < 1:
    raise ValueError('the number of examples per task must be positive')
  docs = stdlib_maker.heldout_documents(cfg)
  fraction = f'data.eval_fraction={cfg.eval_fraction}'
  if not docs:
    raise ValueError(f'{fraction} holds out no stdlib file to build tasks from; {_RAISE}')
  try:
    train, test = stdlib_maker.module_tasks(docs, module_examples)
  except ValueError as e:
    raise ValueError(f'{fraction}: {e}; {_RAISE}') from e
  for name, examples in ((MODULE_TRAIN, train), (MODULE_TEST, test)):
    empty = [p for i, p in enumerate(PACKAGES) if not any(e.label == i for e in examples)]
    if empty:
      raise ValueError(f'{fraction}: {name}: no snippet of {", ".join(empty)} (their '
                       f'held-out files are too short); {_RAISE}')
  next_line = stdlib_maker.next_line_task(docs, next_line_examples)
  if not next_line:
    raise ValueError(f'{fraction}: {NEXT_LINE}: no example in {len(docs)} held-out '
                     f'files; {_RAISE}')
  return {NEXT_LINE: next_line, MODULE_TRAIN: train, MODULE_TEST: test,
          **helpdesk.helpdesk_tasks(docs, train, test)}


def write_tasks(cfg: DataConfig, out_dir: str, **counts: int) -> dict[str, Any]:
  """Builds the tasks (see build_tasks for `counts`) and writes DIR/<task>.jsonl.

  Returns {"out", "eval_fraction", "tasks": [{"task", "path", "examples", "files",
  and for the module tasks "per_class", "files_per_class"}]}.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'--out: {out_dir} is a file, not a folder')
  tasks = build_tasks(cfg, **counts)
  paths = {name: os.path.join(out_dir, name + '.jsonl') for name in tasks}
  existing = [path for path in paths.values() if os.path.exists(path)]
  if existing:  # Task files a user scored with are not replaced behind their back.
    raise ValueError(f'--out: {existing[0]} exists; refusing to overwrite task files '
                     '(choose another --out, or remove them)')
  os.makedirs(out_dir, exist_ok=True)
  summaries = []
  for name, examples in tasks.items():
    path = paths[name]
    _write(path, examples)
    summaries.append(_summary(name, path, examples, classes=name in _CLASSES))
  return {'out': out_dir, 'eval_fraction': cfg.eval_fraction, 'tasks': summaries}
