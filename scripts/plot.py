"""Plots train and eval loss of runs: python scripts/plot.py RUN [RUN ...] --out=FILE.png"""

from absl import app, flags

_OUT = flags.DEFINE_string(
    'out', 'loss.png', "The PNG to write ('.png' is appended unless it names a format).")


def main(argv):
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.experiments import plotting

  runs = argv[1:]
  if not runs:
    cli.fail('name at least one run folder')
  print(cli.run_or_exit(lambda: plotting.plot_runs(runs, _OUT.value)))


if __name__ == '__main__':
  app.run(main)
