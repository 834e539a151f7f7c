"""Multiple-choice metrics from per-choice log-likelihoods; pure functions, numpy only.

accuracy picks the choice of highest log-likelihood, accuracy_norm the highest
log-likelihood per character of the choice: lm-evaluation-harness's acc and acc_norm
(lm_eval/api/task.py, `process_results` for multiple_choice), ties going to the first.

A classification task (every example offers the same choices, the classes) also gets
precision, recall and F1 per class and their macro averages, from the accuracy
predictions, as scikit-learn's `precision_recall_fscore_support` gives them: 0 where a
ratio is 0/0, and the macro average over the classes that occur as a label or a
prediction (with scikit-learn's default `labels=None`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def predictions(loglik: Sequence[Sequence[float]],
                choices: Sequence[Sequence[str]]) -> tuple[list[int], list[int]]:
  """(argmax of log-likelihood, argmax of log-likelihood / characters) per example."""
  raw, norm = [], []
  for ll, texts in zip(loglik, choices, strict=True):
    ll_C = np.asarray(ll, np.float64)
    raw.append(int(np.argmax(ll_C)))
    norm.append(int(np.argmax(ll_C / np.array([float(len(t)) for t in texts]))))
  return raw, norm


def accuracy(labels: Sequence[int], predicted: Sequence[int]) -> float:
  """The fraction of predictions equal to the label."""
  if not labels:
    return 0.0
  return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def confusion_matrix(labels: Sequence[int], predicted: Sequence[int],
                     num_classes: int) -> np.ndarray:
  """counts[i, j]: examples of true class i predicted as class j."""
  counts_CxC = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts_CxC, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
  return counts_CxC


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def precision_recall_f1(counts_CxC: np.ndarray) -> dict[str, Any]:
  """Per class (lists indexed by class) and macro-averaged precision, recall and F1.

  precision_c = TP / predicted c, recall_c = TP / labelled c, F1 = their harmonic mean;
  `support` is the examples labelled c.
  """
  counts_CxC = np.asarray(counts_CxC, np.float64)
  tp_C = np.diag(counts_CxC)
  labelled_C, predicted_C = counts_CxC.sum(1), counts_CxC.sum(0)
  precision_C, recall_C = _ratio(tp_C, predicted_C), _ratio(tp_C, labelled_C)
  f1_C = _ratio(2 * precision_C * recall_C, precision_C + recall_C)
  seen_C = (labelled_C + predicted_C) > 0
  macro = lambda x: float(x[seen_C].mean()) if seen_C.any() else 0.0
  return {'precision': precision_C.tolist(), 'recall': recall_C.tolist(),
          'f1': f1_C.tolist(), 'support': labelled_C.astype(int).tolist(),
          'macro_precision': macro(precision_C), 'macro_recall': macro(recall_C),
          'macro_f1': macro(f1_C)}


def shared_choices(choices: Sequence[Sequence[str]]) -> list[str] | None:
  """The classes when every example offers the same choices in the same order, else None."""
  first = list(choices[0]) if choices else None
  return first if all(list(c) == first for c in choices) else None


def task_scores(loglik: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                labels: Sequence[int]) -> dict[str, Any]:
  """examples, accuracy, accuracy_norm; for a classification task also classes, the
  per-class lists and macro averages of `precision_recall_f1`, and confusion (rows:
  the label, columns: the prediction)."""
  raw, norm = predictions(loglik, choices)
  out: dict[str, Any] = {'examples': len(labels), 'accuracy': accuracy(labels, raw),
                         'accuracy_norm': accuracy(labels, norm)}
  classes = shared_choices(choices)
  if classes is not None:
    counts_CxC = confusion_matrix(labels, raw, len(classes))
    out.update({'classes': classes, **precision_recall_f1(counts_CxC),
                'confusion': counts_CxC.tolist()})
  return out
