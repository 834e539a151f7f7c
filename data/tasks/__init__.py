"""Multiple-choice tasks: the files scripts/eval.py --task scores.

  files.py         task files (JSON lines) read and checked; choices as token rows.
  stdlib_maker.py  scripts/make_tasks.py: tasks built from held-out stdlib files.
"""
