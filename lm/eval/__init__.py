"""Evaluating and using a trained run.

  perplexity.py    the eval step, loss / perplexity / bits per byte, held-out rows.
  score_run.py     scripts/eval.py without --task: a run's held-out split or files.
  tasks.py         scripts/eval.py --task: multiple-choice task files scored.
  task_metrics.py  accuracy, per-class F1 and the confusion matrix (numpy only).
  sampling.py      KV-cache sampling: prefill, then a compiled decode loop.
  quantize.py      weight-only int8 / int4 through qwix, for eval and sampling.
"""
