"""Prunes a run's projections into a new run folder; the source run is only read.

python scripts/prune.py --workdir=RUN --out=NEW_RUN --method=magnitude|wanda|sparsegpt
    (--sparsity=F | --pattern=N:M) [--step=N] [--calibration_rows=16]
python scripts/prune.py --workdir=RUN --out=NEW_RUN --method=structured
    [--d_ff=N] [--num_kv_heads=N] [--num_layers=N] [--step=N] [--calibration_rows=16]

--sparsity: that fraction of every projection's weights (q, k, v, o, gate, up, down) is
zeroed, the same number in each output; --pattern=N:M keeps at most N of every M
consecutive inputs (2:4, 4:8). structured keeps the most important MLP units, kv-head
groups and layers (by their activations) at the sizes given, a smaller dense model
(lm/compress/structured.py). All but magnitude calibrate on --calibration_rows rows of
the run's own training split (lm/compress/prune.py). NEW_RUN is a run
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
_D_FF = flags.DEFINE_integer('d_ff', 0, 'structured: MLP units kept per layer; 0 = all.')
_KV = flags.DEFINE_integer('num_kv_heads', 0, 'structured: kv-head groups kept; 0 = all.')
_LAYERS = flags.DEFINE_integer('num_layers', 0, 'structured: layers kept; 0 = all.')
_ROWS = flags.DEFINE_integer('calibration_rows', 16, 'Training rows wanda and sparsegpt '
                             'calibrate on.')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.compress import prune, structured
  from lm.compress.masks import Sparsity
  from lm.run.folder import load_run

  cli.reject_extra_args(argv)

  def run() -> dict:
    methods = prune.METHODS + (prune.STRUCTURED,)
    if _METHOD.value not in methods:
      raise ValueError(f'--method must be one of {", ".join(methods)}, got {_METHOD.value!r}')
    if _ROWS.value < 1:
      raise ValueError(f'--calibration_rows must be at least 1, got {_ROWS.value}')
    sizes = {f.name: f.value for f in (_D_FF, _KV, _LAYERS)}
    if _METHOD.value == prune.STRUCTURED:
      if _SPARSITY.value is not None or _PATTERN.value:
        raise ValueError('--method=structured takes --d_ff, --num_kv_heads and --num_layers, '
                         'not --sparsity or --pattern')
      sparsity, shape = None, structured.Shape(**sizes)
    else:
      given = [k for k, v in sizes.items() if v]
      if given:
        raise ValueError(f'--{given[0]} is for --method=structured')
      sparsity, shape = Sparsity.parse(_SPARSITY.value, _PATTERN.value), None
    return prune.prune_run(load_run(_WORKDIR.value, _STEP.value), _OUT.value, _METHOD.value,
                           sparsity, shape=shape, calibration_rows_n=_ROWS.value)

  print(json.dumps(cli.run_or_exit(run)))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out', 'method'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
