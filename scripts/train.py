"""Trains a model: python scripts/train.py --config=configs/tiny.py [--config.KEY=VALUE ...]

Running the same command again in the same workdir resumes from its latest checkpoint.
SIGTERM or Ctrl-C: finish the step, save, exit 0. Errors: one line on stderr, exit 1.
The command itself is lm/train/command.py (also `python -m lm.train`).
"""

from lm.train import command

if __name__ == '__main__':
  command.run()
