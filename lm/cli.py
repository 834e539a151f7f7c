"""What every entry point in scripts/ shares: user errors as one line and exit code 1."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar('T')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing where every mistake is one line: `app.run(main, flags_parser=...)`.

  A missing --config file, a bad flag value and an override of a key the config does
  not have (ml-collections raises a chained AttributeError for that) each print one line
  naming the flag or key.
  """
  from absl import flags  # Only scripts parse flags.

  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        fail(f'--config: no such file: {path}')
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    fail(_unknown_override(argv, e))
  except (flags.Error, TypeError, ValueError) as e:
    fail(innermost(e))
  raise AssertionError('unreachable')


def innermost(e: BaseException) -> str:
  """Config errors wrap a KeyError in an AttributeError: the innermost message says most."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)


def _unknown_override(argv: list[str], e: BaseException) -> str:
  """`unknown config key model.flash` for the --config.KEY=VALUE whose KEY does not exist."""
  name = innermost(e).strip('"\' ').split("'")[0]
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if name in key.split('.'):
        return f'unknown config key {key} (in {arg.split("=", 1)[0]})'
  return f'bad config override: {innermost(e)}'


def reject_extra_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')


def fail(message: str, *, now: bool = False) -> None:
  """One line on stderr, exit 1. `now`: without waiting for other threads (see below)."""
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  if now:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  sys.exit(1)


def run_or_exit(fn: Callable[[], T], *errors: type[BaseException],
                exit_now: tuple[type[BaseException], ...] = ()) -> T:
  """Runs `fn`; a ValueError, an OSError (a full disk, a missing folder, ...) or one of
  `errors` ends the process with one line.

  exit_now: errors after which library threads may never finish (Orbax's, after a save
  failed in the background, wait minutes for a folder that was never made); `fn` has
  closed everything of its own by then, so the process exits without waiting for them.
  """
  try:
    return fn()
  except OSError as e:
    where = f' ({e.filename})' if e.filename and e.filename not in str(e) else ''
    fail(f'{e}{where}', now=isinstance(e, exit_now))
    raise  # Unreachable: fail exits.
  except (ValueError, *errors) as e:
    fail(str(e), now=isinstance(e, exit_now))
    raise  # Unreachable: fail exits.


def define_run_flags() -> tuple[Any, Any]:
  """--workdir and --step, as every script that reads a trained run takes
  them; returns their FlagHolders."""
  from absl import flags

  workdir = flags.DEFINE_string('workdir', None, 'Run folder (holds config.json, checkpoints/).')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  return workdir, step


def define_quantize_flags() -> Callable[[], tuple[str, int, bool]]:
  """--quantize, --quantize_group and --quantize_embeddings (eval.py, generate.py,
  bench.py); returns their reader, whose tuple makes a lm.eval.quantize.QuantConfig."""
  from absl import flags

  mode = flags.DEFINE_enum('quantize', 'none', ['none', 'int8', 'int4'],
                           'Weight-only quantisation of the blocks\' matrices '
                           '(lm/eval/quantize.py); the embedding, output head and norms stay as '
                           'trained.')
  group = flags.DEFINE_integer('quantize_group', 32, 'int4: weights per scale along the '
                               'contracted axis; must divide d_model, d_ff and head_dim.')
  embeddings = flags.DEFINE_bool('quantize_embeddings', False, 'Quantise the embedding and '
                                 'output head too (one scale per vocabulary entry).')
  return lambda: (mode.value, group.value, embeddings.value)
