"""Prunes a run's projections into a new run folder; the source run is only read.

python scripts/prune.py --workdir=RUN --out=NEW_RUN --method=magnitude|wanda|sparsegpt
    (--sparsity=F | --pattern=N:M) [--step=N] [--calibration_rows=16]

--sparsity: that fraction of every projection's weights (q, k, v, o, gate, up, down) is
zeroed, the same number in each output; --pattern=N:M keeps at most N of every M
consecutive inputs (2:4, 4:8). wanda and sparsegpt calibrate on --calibration_rows rows
of the run's own training split, layer by layer (lm/compress/prune.py). NEW_RUN is a run
folder every script reads (eval.py, generate.py, serve.py, export_hf.py, export_gguf.py,
init_from), plus masks.npz and prune.json. The last stdout line is prune.json as JSON.
"""

import json

from absl import app, flags, logging

from lm.cli import define_run_flags

_WORKDIR, _STEP = define_run_flags()
_OUT = flags.DEFINE_string('out', None, 'The new run folder; must not exist.')
_METHOD = flags.DEFINE_string('method', None, 'magnitude, wanda or sparsegpt.')
_SPARSITY = flags.DEFINE_float('sparsity', None, 'Fraction of each projection pruned, in (0, 1).')
_PATTERN = flags.DEFINE_string('pattern', None, 'N:M semi-structured sparsity, e.g. 2:4.')
_ROWS = flags.DEFINE_integer('calibration_rows', 16, 'Training rows wanda and sparsegpt '
                             'calibrate on.')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.compress import prune
  from lm.compress.masks import Sparsity
  from lm.run.folder import load_run

  cli.reject_extra_args(argv)

  def run() -> dict:
    if _METHOD.value == 'structured':
      raise ValueError('--method=structured (removing heads, MLP units and layers) is not '
                       'available yet; use magnitude, wanda or sparsegpt')
    if _METHOD.value not in prune.METHODS:
      raise ValueError(f'--method must be one of {", ".join(prune.METHODS)}, got '
                       f'{_METHOD.value!r}')
    if _ROWS.value < 1:
      raise ValueError(f'--calibration_rows must be at least 1, got {_ROWS.value}')
    sparsity = Sparsity.parse(_SPARSITY.value, _PATTERN.value)
    return prune.prune_run(load_run(_WORKDIR.value, _STEP.value), _OUT.value, _METHOD.value,
                           sparsity, calibration_rows_n=_ROWS.value)

  print(json.dumps(cli.run_or_exit(run)))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out', 'method'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
