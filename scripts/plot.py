"""Plots train and eval loss of runs: python scripts/plot.py RUN [RUN ...] --out=FILE.png"""

import sys

from absl import app, flags

_OUT = flags.DEFINE_string(
    'out', 'loss.png', "The PNG to write ('.png' is appended unless it names a format).")


def main(argv):
  runs = argv[1:]
  if not runs:
    print('error: name at least one run folder', file=sys.stderr)
    sys.exit(1)
  from lm import plotting  # After flag parsing, so --help stays fast.

  try:
    written = plotting.plot_runs(runs, _OUT.value)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(written)


if __name__ == '__main__':
  app.run(main)
