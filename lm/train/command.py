"""The training command: `python scripts/train.py` and `python -m lm.train` both run it.

--config=FILE [--config.KEY=VALUE ...]. Running it again in the same workdir resumes from
its latest checkpoint. SIGTERM or Ctrl-C: finish the step, save, exit 0. Errors: one
line on stderr, exit 1. Living in the package (not only in scripts/) lets a sweep start
training from an installed wheel.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0-based.')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout', 100,
                                  'Seconds without a heartbeat before a process is dead.')


def main(argv: list[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  from lm import cli, distributed  # After flag parsing, so --help stays fast.
  from lm.run.checkpoint import SaveFailed
  from lm.train import trainer
  cli.reject_extra_args(argv)  # e.g. `config.steps=20` without the leading --

  def train():
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_seconds=_HEARTBEAT.value)
    return trainer.train(_CONFIG.value)

  result = cli.run_or_exit(train, trainer.TrainingAborted, SaveFailed, exit_now=(SaveFailed,))
  if trainer.is_main_process():  # Only process 0 prints.
    print(json.dumps(result))


def run() -> None:
  """Parses the command line and trains."""
  flags.mark_flags_as_required(['config'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
