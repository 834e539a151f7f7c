"""`python -m lm.train --config=FILE ...`: the training command (lm/train/command.py)."""

from lm.train import command

command.run()
