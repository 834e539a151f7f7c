"""Training.

  step.py     the train state, sharded initialisation and the jitted train step.
  resume.py   where a run starts: its latest good checkpoint, another run, or init.
  stops.py    stop requests (SIGTERM, preemption) and the non-finite loss guard.
  trainer.py  the loop: set up, restore or init, step, log, evaluate, save.
  command.py  the training command (scripts/train.py, `python -m lm.train`).
"""
