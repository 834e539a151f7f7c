"""Multiple-choice tasks: the files scripts/eval.py --task scores.

  record.py        the task record (context, choices, label): one check, one error text,
                   and the one context / continuation split (lm-evaluation-harness's),
                   shared by task files, SFT data and the stdlib task maker.
  files.py         task files (JSON lines) read and checked; choices as token rows.
  stdlib_maker.py  scripts/make_tasks.py: tasks built from held-out stdlib files.
"""
