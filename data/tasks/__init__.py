"""Multiple-choice tasks: the files scripts/eval.py --task scores.

  record.py        the task record (context, choices, label): one check, one error text,
                   and the one context / continuation split (lm-evaluation-harness's),
                   shared by task files, SFT data and the stdlib task maker.
  files.py         task files (JSON lines) read and checked; choices as token rows.
  stdlib_maker.py  the next-line and package tasks, from held-out stdlib files.
  helpdesk.py      help-desk questions from the same files (fine-tuning data that scores).
  make.py          scripts/make_tasks.py: every task built and written.
"""
