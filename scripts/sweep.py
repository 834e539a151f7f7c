"""Trains a grid of runs: python scripts/sweep.py --config=configs/tiny.py
    --grid='model.d_model=64,128' --grid='optimizer.lr=1e-3,3e-3' [--steps=N] --out=DIR

Every point of the cartesian grid is a plain scripts/train.py run in DIR/runs/<name>/,
with any fixed --config.KEY=VALUE overrides given here. Running the same command again
skips finished points and resumes the others. Writes DIR/results.jsonl (one line per
point), DIR/fit.json, and plots of the loss against --x and against compute, with the
power law L(C) = E + A * C^-alpha fitted to the best point of each compute budget.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_GRID = flags.DEFINE_multi_string('grid', [], 'KEY=V1,V2,...: one axis of the grid.')
_STEPS = flags.DEFINE_integer('steps', None, "Steps of every point (default: the config's).")
_OUT = flags.DEFINE_string('out', None, 'The sweep folder.')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Points trained at once: on GPUs, each gets 1/N of them '
    '(CUDA_VISIBLE_DEVICES); on a CPU they share the cores.')
_GPUS = flags.DEFINE_string('gpus', '', 'GPU ids to share out (default: '
                            'CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists).')
_X = flags.DEFINE_string('x', '', 'The --grid key to plot the loss against '
                         '(default: optimizer.lr if varied, else the first).')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  import jax
  # This process only reads configs and run folders: should anything touch jax's
  # backend, it must not take GPU memory the points need (children get the real env).
  jax.config.update('jax_platforms', 'cpu')
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.experiments import sweep, sweep_runner

  cli.reject_extra_args(argv)

  def run():
    grid = sweep.parse_grid(_GRID.value)
    spec = sweep.Spec(config=config_flags.get_config_filename(flags.FLAGS['config']),
                      grid=grid, overrides=sweep.fixed_overrides(sys.argv, grid),
                      steps=_STEPS.value)
    return sweep_runner.run_sweep(_CONFIG.value, spec, _OUT.value, parallel=_PARALLEL.value,
                                  gpus=_GPUS.value, x=_X.value)

  sys.exit(cli.run_or_exit(run))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'out'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
