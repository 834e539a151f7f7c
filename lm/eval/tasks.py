"""Scores a run on multiple-choice task files: scripts/eval.py --task.

Each choice is one row, context then choice (data/tasks/files.py says how they are split
into tokens and cut to the model's window, as lm-evaluation-harness does); its score is
the summed log-likelihood of the choice's tokens. Rows are sorted longest first and
grouped into global batches padded to a few fixed shapes: lengths are rounded up to a
power of two (at least MIN_LENGTH, at most the run's seq_len), and a batch of length T
holds batch_size * (seq_len // T) rows, about the tokens of a training batch, so each
length compiles once. A mask keeps padding out of the sums (lm/eval/perplexity.py's
`make_row_nll_step`), and the batches are sharded on the run's mesh like the rest of
scripts/eval.py.

The result of one task is {"step", "task", "examples", "truncated", "accuracy",
"accuracy_norm"} plus, for classification tasks, the per-class and macro scores of
lm/eval/task_metrics.py; several tasks give {"step", "tasks": [one record each, no "step"]}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from data.batch import Batch
from data.tasks.files import ChoiceRow, Example, choice_rows, read_task, task_paths
from lm.eval.perplexity import ScoredBatch, make_row_nll_step
from lm.eval.quantize import NONE, QuantConfig, load_quantized_run, weights_record
from lm.eval.score_run import local_rows
from lm.eval.task_metrics import task_scores
from lm.run.folder import Run
from lm.sharding import put_rows

MIN_LENGTH = 16


def bucket_length(n: int, seq_len: int) -> int:
  """The padded input length for a row of n inputs: a power of two in [MIN_LENGTH, seq_len]."""
  return min(max(MIN_LENGTH, 1 << max(n - 1, 0).bit_length()), seq_len)


def pack_rows(rows: Sequence[ChoiceRow], batch_size: int,
              seq_len: int) -> list[tuple[np.ndarray, ScoredBatch]]:
  """Global batches (tokens (B, T + 1), mask (B, T)), each with `index`: batch row r
  holds rows[index[r]], and the rows past len(index) are zeros, masked out. Rows go
  longest first."""
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
  out = []
  start = 0
  while start < len(order):
    t = bucket_length(len(rows[order[start]].tokens) - 1, seq_len)
    num = batch_size * max(1, seq_len // t)
    index = np.array(order[start:start + num])
    tokens_BxT1 = np.zeros((num, t + 1), np.int32)
    mask_BxT = np.zeros((num, t), np.int32)
    for r, i in enumerate(index):
      ids, n = rows[i].tokens, rows[i].scored
      tokens_BxT1[r, :len(ids)] = ids
      mask_BxT[r, len(ids) - 1 - n:len(ids) - 1] = 1  # Targets are ids[1:]: the last n.
    out.append((index, (Batch(tokens_BxT1), mask_BxT)))
    start += num
  return out


class RowScorer:
  """Scores rows on a run: the summed log-likelihood of each row's scored tokens.

  One compiled step per padded shape, kept across calls (and so across tasks).
  """

  def __init__(self, run: Run) -> None:
    self.run = run
    self._shardings = jax.tree.map(lambda x: x.sharding, run.params)
    self._steps: dict[tuple[int, int], Callable[..., Any]] = {}

  def __call__(self, rows: Sequence[ChoiceRow]) -> np.ndarray:
    run = self.run
    loglik = np.zeros(len(rows), np.float64)
    for index, batch in pack_rows(rows, run.cfgs.run.batch_size, run.cfgs.run.seq_len):
      shape = batch[0].tokens.shape
      if shape not in self._steps:
        self._steps[shape] = make_row_nll_step(run.model, run.rules, shape, self._shardings,
                                               loss_chunk=run.cfgs.loss.chunk)
      nll_B = self._steps[shape](run.params, *put_rows(local_rows(batch), run.rules))
      loglik[index] = -np.asarray(nll_B)[:len(index)]
    return loglik


def score_examples(scorer: RowScorer,
                   examples: Sequence[Example]) -> tuple[list[list[float]], int]:
  """(log-likelihood of each choice, per example; examples whose context was cut)."""
  run = scorer.run
  per_example = [choice_rows(run.tokenizer, ex, run.cfgs.run.seq_len) for ex in examples]
  loglik = scorer([row for rows in per_example for row in rows])
  out, start = [], 0
  for rows in per_example:
    out.append(loglik[start:start + len(rows)].tolist())
    start += len(rows)
  cut = sum(any(row.cut for row in rows) for rows in per_example)
  return out, cut


def evaluate_task(scorer: RowScorer, name: str, examples: Sequence[Example]) -> dict[str, Any]:
  """One task's record: {"task", "examples", "truncated", "accuracy", ...}."""
  loglik, cut = score_examples(scorer, examples)
  scores = task_scores(loglik, [ex.choices for ex in examples], [ex.label for ex in examples])
  return {'task': name, 'examples': scores.pop('examples'), 'truncated': cut, **scores}


def evaluate_tasks(workdir: str, spec: str, *, step: int | None = None, max_examples: int = 0,
                   quant: QuantConfig = NONE) -> dict[str, Any]:
  """Scores the task files `spec` names (comma-separated paths or globs) on RUN's
  checkpoint `step` (default the latest), the first max_examples of each if > 0, with
  its weights quantised if `quant` says so."""
  if max_examples < 0:
    raise ValueError(f'--max_examples must be >= 0, got {max_examples}')
  # Every file is read and checked before the (slower) restore of the parameters.
  tasks = [(name, read_task(path, max_examples)) for name, path in task_paths(spec)]
  run = load_quantized_run(workdir, step, quant)
  scorer = RowScorer(run)
  records = [evaluate_task(scorer, name, examples) for name, examples in tasks]
  if len(records) == 1:
    return {'step': run.step, **records[0], **weights_record(run)}
  return {'step': run.step, 'tasks': records, **weights_record(run)}


def report_lines(result: dict[str, Any]) -> list[str]:
  """One line per task, then one per class of a classification task."""
  lines = []
  for r in result.get('tasks', [result]):
    line = (f'{r["task"]}: accuracy={r["accuracy"]:.4f} accuracy_norm={r["accuracy_norm"]:.4f}'
            f' examples={r["examples"]} truncated={r["truncated"]}')
    if 'classes' in r:
      line += (f' macro_precision={r["macro_precision"]:.4f} '
               f'macro_recall={r["macro_recall"]:.4f} macro_f1={r["macro_f1"]:.4f}')
    lines.append(line)
    for c, name in enumerate(r.get('classes', [])):
      lines.append(f'  {name!r}: precision={r["precision"][c]:.4f} recall={r["recall"][c]:.4f}'
                   f' f1={r["f1"][c]:.4f} support={r["support"][c]} '
                   f'confusion={r["confusion"][c]}')
  return lines + [f'step {result["step"]}']
