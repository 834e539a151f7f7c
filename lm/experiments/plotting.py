"""Loss curves of several runs on one figure, from each RUN/metrics.jsonl, and a
sweep's final losses against a key, and its evaluations against compute."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lm.run import layout
from lm.run.metrics import read_records


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{'loss': [(step, value)], 'eval_loss': [...]}, sorted by step.

  A step logged twice (a run resumed from an earlier checkpoint) keeps its last value.
  """
  path = os.path.join(workdir, layout.METRICS)
  if not os.path.isfile(path):
    raise ValueError(f'no metrics.jsonl in {workdir}')
  curves: dict[str, dict[int, float]] = {'loss': {}, 'eval_loss': {}}
  for record in read_records(path):
    for key, points in curves.items():
      if isinstance(record.get(key), (int, float)):
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
  if os.path.isdir(out):
    raise ValueError(f'--out: {out} is a folder; name the file to write')
  curves = [read_curves(w) for w in workdirs]
  for workdir, run in zip(workdirs, curves):
    if not run['loss'] and not run['eval_loss']:  # A blank plot would pass for a result.
      raise ValueError(f'nothing to plot: {os.path.join(workdir, layout.METRICS)} has no '
                       'train or eval loss yet')
  plt = _pyplot()
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
  return _save(fig, plt, out)


def _pyplot():
  import matplotlib  # Imported here: only plotting needs it.
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  return plt


def _save(fig, plt, out: str) -> str:
  fig.tight_layout()
  # Given the format, matplotlib writes exactly this path (it would append '.png'
  # itself, unseen by the caller, or reject a name like 'runs/v1.2').
  fmt = os.path.splitext(out)[1][1:].lower()
  if fmt not in fig.canvas.get_supported_filetypes():
    out, fmt = out + '.png', 'png'
  fig.savefig(out, dpi=100, format=fmt)
  plt.close(fig)
  return out


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_sweep_x(rows: Sequence[Mapping[str, Any]], x_key: str, group_keys: Sequence[str],
                 out: str) -> str:
  """A sweep's final eval loss against `x_key`, one line per combination of the other
  varied keys (say, loss against learning rate, a line per width). Numbers spanning 3x
  or more get a log axis; other values are placed in grid order."""
  plt = _pyplot()
  done = [r for r in rows if r.get('final_eval_loss') is not None]
  numeric = all(_is_number(r[x_key]) for r in rows)
  order = list(dict.fromkeys(r[x_key] for r in rows))
  where = (lambda v: v) if numeric else order.index
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in done:
    groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for values, members in groups.items():
    members = sorted(members, key=lambda r: where(r[x_key]))
    label = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in zip(group_keys, values))
    ax.plot([where(r[x_key]) for r in members], [r['final_eval_loss'] for r in members],
            marker='o', label=label or None)
  if numeric and order and min(order) > 0 and max(order) >= 3 * min(order):
    ax.set_xscale('log')
  if not numeric:
    ax.set_xticks(range(len(order)), [str(v) for v in order])
  ax.set_xlabel(x_key)
  ax.set_ylabel('final eval loss (nats/token)')
  ax.grid(alpha=0.3)
  if group_keys and ax.lines:
    ax.legend()
  return _save(fig, plt, out)


def plot_sweep_compute(rows: Sequence[Mapping[str, Any]],
                       evals: Sequence[Mapping[str, Any]],
                       frontier: Sequence[Mapping[str, Any]], fit: Any, out: str) -> str:
  """Eval loss against training FLOPs: each finished point's evaluations as a curve and
  its final one as a dot, the compute frontier joined, and the fitted power law `fit` (a
  callable with `describe()`) if any."""
  import numpy as np
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in dict.fromkeys(e['name'] for e in evals):
    curve = [e for e in evals if e['name'] == name]
    ax.plot([e['flops'] for e in curve], [e['eval_loss'] for e in curve], color='0.85',
            linewidth=1)
  done = [r for r in rows if r.get('final_eval_loss') is not None]
  ax.scatter([r['flops'] for r in done], [r['final_eval_loss'] for r in done],
             color='0.5', label='each point, final', zorder=2)
  ax.plot([e['flops'] for e in frontier], [e['eval_loss'] for e in frontier],
          color='k', marker='o', markersize=3, label='compute frontier', zorder=3)
  if fit is not None:
    c = np.geomspace(frontier[0]['flops'], frontier[-1]['flops'], 100)
    ax.plot(c, fit(c), color='C3', linestyle='--',
            label=f'E + A C^-alpha, alpha = {fit.alpha:.3g}', zorder=4)
  ax.set_xscale('log')
  ax.set_xlabel('training FLOPs (6N + 12 L H Q T per token)')
  ax.set_ylabel('eval loss (nats/token)')
  ax.grid(alpha=0.3)
  if ax.collections or ax.lines:
    ax.legend()
  return _save(fig, plt, out)
