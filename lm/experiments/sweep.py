"""scripts/sweep.py's logic: a cartesian grid of config overrides, each point a plain
`scripts/train.py` run folder, and one table of the results.

OUT/sweep.json      what was asked (config, grid, fixed overrides, steps); another
                    sweep into the same OUT is refused
OUT/runs/<name>/    one ordinary run folder per point, named by the values it varies
OUT/logs/<name>.log each point's train.py output, appended across attempts
OUT/attempts.jsonl  one line per train.py process: point, exit code, wall seconds
OUT/results.jsonl   one line per point (see `result_row`)
OUT/fit.json, OUT/loss_vs_<key>.png, OUT/loss_vs_compute.png

A point is finished when its run folder holds a committed checkpoint of the final step
and metrics.jsonl an eval line of that step; anything less is trained again by running
train.py in the same folder, which resumes where the folder stands.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from lm.config import Configs, parse, parse_values, set_key, with_values
from lm.model import flops
from lm.run import layout

# The training command as a module, so an installed wheel (which has no scripts/) sweeps.
TRAIN_COMMAND = ('-m', 'lm.train')
# Keys the sweep sets itself: every point has its own run folder.
RESERVED_KEYS = ('workdir',)


@dataclasses.dataclass(frozen=True)
class Axis:
  """One --grid: a config key and its values as written on the command line."""

  key: str
  texts: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a sweep is: recorded in OUT/sweep.json, so a rerun can tell it is the same."""

  config: str  # The --config file, as given.
  grid: tuple[Axis, ...]
  overrides: tuple[str, ...]  # Fixed --config.KEY=VALUE arguments, passed to every point.
  steps: int | None  # --steps, or None for the config's.

  def to_json(self) -> dict[str, Any]:
    return {'config': self.config, 'grid': [[a.key, list(a.texts)] for a in self.grid],
            'overrides': list(self.overrides), 'steps': self.steps}


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the grid: its name, the (key, text) pairs it sets and the typed values."""

  name: str
  texts: tuple[tuple[str, str], ...]
  values: Mapping[str, Any]
  cfgs: Configs
  workdir: str


def parse_grid(specs: Sequence[str]) -> tuple[Axis, ...]:
  """`KEY=V1,V2,...` each; errors name the --grid they come from."""
  axes: list[Axis] = []
  for spec in specs:
    key, texts = parse_values(spec, '--grid')
    if key in RESERVED_KEYS:
      raise ValueError(f'--grid={spec!r}: the sweep sets {key} itself, one run folder a point')
    if any(a.key == key for a in axes):
      raise ValueError(f'--grid: {key} is given twice; list its values in one --grid')
    if len(set(texts)) != len(texts):
      raise ValueError(f'--grid={spec!r}: a value is listed twice')
    axes.append(Axis(key, texts))
  if not axes:
    raise ValueError('name at least one --grid=KEY=V1,V2,...')
  return tuple(axes)


def point_name(texts: Sequence[tuple[str, str]]) -> str:
  """`d_model=64,lr=1e-3`: each key's last part (the whole key where two share it) and the
  value as written; characters a folder name cannot hold become '_'."""
  short = [k.split('.')[-1] for k, _ in texts]
  parts = [f'{s if short.count(s) == 1 else k}={t}' for s, (k, t) in zip(short, texts)]
  return ''.join(c if c.isalnum() or c in '=,._-+' else '_' for c in ','.join(parts))


def make_points(config: ml_collections.ConfigDict, spec: Spec, out: str) -> list[Point]:
  """Every point of the grid, each config set and validated as train.py would, so a bad
  key or value stops the sweep before any run starts."""
  for axis in spec.grid:  # One error per bad key or value, naming the --grid.
    seen: dict[Any, str] = {}
    for text in axis.texts:
      _, set_values = with_values(config, [(axis.key, text)], '--grid')
      value = set_values[axis.key]
      if repr(value) in seen:  # 1e-3 and 0.001: two folders, one run.
        raise ValueError(f'--grid {axis.key}: {seen[repr(value)]} and {text} are one value')
      seen[repr(value)] = text
  points = []
  for combo in itertools.product(*[[(a.key, t) for t in a.texts] for a in spec.grid]):
    name = point_name(combo)
    point_config, values = with_values(config, combo, '--grid')
    if spec.steps is not None:
      set_key(point_config, 'steps', str(spec.steps))
    workdir = os.path.join(out, 'runs', name)
    point_config.workdir = workdir
    try:
      cfgs = parse(point_config)
    except ValueError as e:
      raise ValueError(f'point {name}: {e}') from None
    if not (cfgs.run.eval_batches and cfgs.data.eval_fraction):
      raise ValueError('a sweep compares final held-out losses: eval_batches and '
                       'data.eval_fraction must be above 0')
    twin = next((p for p in points if p.name == name), None)
    if twin:  # Values that differ only in characters a folder name cannot hold.
      said = lambda texts: ','.join(f'{k}={t}' for k, t in texts)
      raise ValueError(f'{said(twin.texts)} and {said(combo)} would share the run folder '
                       f'{workdir}')
    points.append(Point(name, tuple(combo), values, cfgs, workdir))
  return points


def check_spec(out: str, spec: Spec) -> None:
  """Records the spec in OUT/sweep.json, or refuses a different one already there."""
  path = os.path.join(out, 'sweep.json')
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      before = json.load(f)
    now = spec.to_json()
    for key in now:
      if before.get(key) != now[key]:
        raise ValueError(f'{out} holds another sweep ({key}: {before.get(key)} there, '
                         f'{now[key]} now); give a new --out, or the same arguments '
                         f'to continue it')
    return
  os.makedirs(out, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(spec.to_json(), f, indent=2)
    f.write('\n')


def child_argv(spec: Spec, point: Point) -> list[str]:
  """The training command line of a point (lm/train/command.py, what scripts/train.py
  runs): the config, the fixed overrides, the point's own values, the steps and its run
  folder."""
  argv = [sys.executable, *TRAIN_COMMAND, f'--config={spec.config}', *spec.overrides]
  argv += [f'--config.{key}={text}' for key, text in point.texts]
  if spec.steps is not None:
    argv.append(f'--config.steps={spec.steps}')
  return argv + [f'--config.workdir={point.workdir}']


def final_eval_loss(point: Point) -> float | None:
  """The eval loss of the final step if the point is finished, else None."""
  from lm.experiments.plotting import read_curves  # matplotlib-free, but only needed here.
  from lm.run.folder import RunFolder  # Imports Orbax: only once points are checked.

  steps = point.cfgs.run.steps
  if not os.path.isfile(os.path.join(point.workdir, layout.METRICS)):
    return None
  if steps not in RunFolder(point.workdir).steps():
    return None
  return dict(read_curves(point.workdir)['eval_loss']).get(steps)


def config_drift(point: Point) -> str | None:
  """How the config in a point's run folder (what its train.py ran) differs from the
  point's config as the sweep makes it now, as `KEY: A there, B now; ...`; None when they
  agree or no run has begun. A difference means the config file, or one it imports, was
  edited since that run began: its loss would sit in the table under values it was not
  trained with."""
  from lm.config import as_dict
  from lm.run.folder import RunFolder  # Imports Orbax: only once points are checked.

  folder = RunFolder(point.workdir)
  if not os.path.isfile(folder.config_path):
    return None
  ran, now = _flat(as_dict(folder.config())), _flat(as_dict(point.cfgs))
  keys = sorted((set(ran) | set(now)) - set(RESERVED_KEYS))
  diffs = [f'{k}: {ran.get(k)!r} there, {now.get(k)!r} now' for k in keys
           if ran.get(k) != now.get(k)]
  return '; '.join(diffs) or None


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def read_attempts(out: str) -> dict[str, list[dict[str, Any]]]:
  """OUT/attempts.jsonl by point name (a line torn by a kill is passed over)."""
  path, by_name = os.path.join(out, 'attempts.jsonl'), {}
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        by_name.setdefault(record['name'], []).append(record)
  return by_name


def result_row(point: Point, loss: float | None, attempts: Sequence[Mapping[str, Any]]
               ) -> dict[str, Any]:
  """One line of results.jsonl: the point's name and varied values, parameters, tokens
  and training FLOPs (PaLM's 6N + 12·L·H·Q·T per token, lm/model/flops.py), the final eval
  loss, the wall seconds of all its train.py processes, and its status."""
  run = point.cfgs.run
  tokens = run.steps * run.batch_size * run.seq_len
  status = 'done' if loss is not None else (
      'failed' if attempts and attempts[-1]['rc'] != 0 else 'pending')
  if status == 'done' and config_drift(point):
    status = 'config_changed'  # Its loss is kept, but neither fitted nor called done.
  return {'name': point.name, **point.values,
          'params': flops.num_params(point.cfgs.model), 'tokens': tokens,
          'flops': tokens * flops.flops_per_token(point.cfgs.model, run.seq_len),
          'final_eval_loss': loss,
          'wall_s': round(sum(a['wall_s'] for a in attempts), 2), 'status': status}


def write_results(out: str, points: Sequence[Point]) -> list[dict[str, Any]]:
  """OUT/results.jsonl from the run folders as they stand, in grid order."""
  attempts = read_attempts(out)
  rows = [result_row(p, final_eval_loss(p), attempts.get(p.name, [])) for p in points]
  tmp = os.path.join(out, 'results.jsonl.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  os.replace(tmp, os.path.join(out, 'results.jsonl'))  # Never half a table.
  return rows


def pick_x(spec: Spec, x: str) -> str:
  """The key the loss is drawn against: --x, else optimizer.lr if varied, else the first."""
  keys = [a.key for a in spec.grid]
  if x and x not in keys:
    raise ValueError(f'--x={x} is not a --grid key ({", ".join(keys)})')
  return x or ('optimizer.lr' if 'optimizer.lr' in keys else keys[0])


def evaluations(points: Sequence[Point], rows: Sequence[Mapping[str, Any]]
                ) -> list[dict[str, Any]]:
  """Every held-out evaluation of the finished points: the point's name, the step, the
  training FLOPs up to that step and the eval loss. Each is a point of loss against
  compute, as a run's final one is, so a few widths evaluated along the way give the
  frontier many budgets without more runs (Kaplan et al.'s learning-curve envelope)."""
  from lm.experiments.plotting import read_curves

  found = []
  for point, row in zip(points, rows):
    if row['status'] != 'done':
      continue
    per_step = row['flops'] / point.cfgs.run.steps
    for step, loss in read_curves(point.workdir)['eval_loss']:
      if 0 < step <= point.cfgs.run.steps:
        found.append({'name': point.name, 'step': step, 'flops': step * per_step,
                      'eval_loss': loss})
  return found


def report(out: str, points: Sequence[Point], rows: Sequence[Mapping[str, Any]], spec: Spec,
           x_key: str) -> list[str]:
  """OUT/fit.json and the two plots; returns the lines to print (the fit, or why not).

  The power law is fitted to the compute frontier of every evaluation of every finished
  point. An evaluation before the end of a decaying schedule is at a higher rate than a
  run that ends there would be, so it lies above the frontier such a run would reach:
  the frontier errs high, never low (each point's final step is exact).
  """
  from lm.experiments import plotting, scaling_fit

  evals = evaluations(points, rows)
  frontier = [evals[i] for i in scaling_fit.compute_frontier(
      [e['flops'] for e in evals], [e['eval_loss'] for e in evals])]
  fit, why_not = None, scaling_fit.underdetermined(len(frontier))
  if why_not is None:
    fit = scaling_fit.fit_power_law([e['flops'] for e in frontier],
                                    [e['eval_loss'] for e in frontier])
  with open(os.path.join(out, 'fit.json'), 'w', encoding='utf-8') as f:
    json.dump({'fit': dataclasses.asdict(fit) if fit else None, 'not_fitted': why_not,
               'frontier': frontier}, f, indent=2)
    f.write('\n')
  others = [a.key for a in spec.grid if a.key != x_key]
  plots = [plotting.plot_sweep_x(rows, x_key, others, os.path.join(
               out, f'loss_vs_{x_key.split(".")[-1]}.png')),
           plotting.plot_sweep_compute(rows, evals, frontier, fit,
                                       os.path.join(out, 'loss_vs_compute.png'))]
  return [fit.describe() if fit else why_not, f'plots: {", ".join(plots)}']


def fixed_overrides(argv: Sequence[str], grid: Sequence[Axis]) -> tuple[str, ...]:
  """The --config.KEY=VALUE arguments of the sweep's own command line, as written, for
  every point (absl's `--config.KEY VALUE` is joined into one, `--noconfig.KEY` kept)."""
  args, out = list(argv[1:]), []
  for i, arg in enumerate(args):
    if not arg.startswith(('--config.', '--noconfig.')):
      continue
    if '=' not in arg and i + 1 < len(args) and not args[i + 1].startswith('-'):
      arg = f'{arg}={args[i + 1]}'
    key = arg.split('=', 1)[0].removeprefix('--no').removeprefix('--').removeprefix('config.')
    if key in RESERVED_KEYS:
      raise ValueError(f'--config.{key}: the sweep sets {key} itself, one run folder a point')
    if any(a.key == key for a in grid):
      raise ValueError(f'{key} is both a --grid and a fixed --config.{key}; give it once')
    out.append(arg)
  return tuple(out)
