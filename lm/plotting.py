"""Loss curves of several runs on one figure, from each RUN/metrics.jsonl."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{'loss': [(step, value)], 'eval_loss': [...]}, sorted by step.

  A step logged twice (a run resumed from an earlier checkpoint) keeps its last value.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise ValueError(f'no metrics.jsonl in {workdir}')
  curves: dict[str, dict[int, float]] = {'loss': {}, 'eval_loss': {}}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{n}: not JSON: {e}') from e
      for key, points in curves.items():
        if isinstance(record.get(key), (int, float)) and 'step' in record:
          points[int(record['step'])] = float(record[key])
  return {key: sorted(points.items()) for key, points in curves.items()}


def run_names(workdirs: Sequence[str]) -> list[str]:
  """Folder names, or the paths as given where two runs share a folder name."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else w for n, w in zip(names, workdirs)]


def plot_runs(workdirs: Sequence[str], out: str) -> str:
  """Writes a PNG: train loss (left) and eval loss (right) against step, one line a run.

  `out` ending in another format matplotlib writes (.svg, .pdf, ...) gets that format;
  otherwise '.png' is appended. Returns the path written.
  """
  import matplotlib  # Imported here: only plotting needs it.
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  curves = [read_curves(w) for w in workdirs]
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for i, (name, run) in enumerate(zip(run_names(workdirs), curves)):
    color = colors[i % len(colors)]  # A run has the same color in both panels.
    for ax, key in ((train_ax, 'loss'), (eval_ax, 'eval_loss')):
      if run[key]:
        steps, values = zip(*run[key])
        ax.plot(steps, values, color=color, label=name, marker='o' if key == 'eval_loss'
                else None, markersize=3)
  for ax, title in ((train_ax, 'train loss'), (eval_ax, 'eval loss')):
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  train_ax.set_ylabel('loss (nats/token)')
  fig.tight_layout()
  # Given the format, matplotlib writes exactly this path (it would append '.png'
  # itself, unseen by the caller, or reject a name like 'runs/v1.2').
  fmt = os.path.splitext(out)[1][1:].lower()
  if fmt not in fig.canvas.get_supported_filetypes():
    out, fmt = out + '.png', 'png'
  fig.savefig(out, dpi=100, format=fmt)
  plt.close(fig)
  return out
