"""Benchmarks a config's train step: python scripts/bench.py --config=configs/NAME.py [--aot]

Prints one JSON line: tokens/s, step time, MFU (PaLM formula; `mfu_causal` counts only
the causal half of attention), TFLOP/s, compile time, per-device memory, and the input
pipeline's own tokens/s. `--aot` compiles for the config's mesh from shapes alone.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_AOT = flags.DEFINE_bool('aot', False, 'Compile without running: memory and FLOPs only.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
_DATA_BATCHES = flags.DEFINE_integer('data_batches', 20,
                                     'Batches for data_tokens_per_sec; 0 skips it.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm import bench, cli  # After flag parsing, so --help stays fast.

  def measure():
    if _AOT.value:
      return bench.run_aot(_CONFIG.value)
    result = bench.run_steps(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value)
    if _DATA_BATCHES.value:
      result.update(bench.data_throughput(_CONFIG.value, batches=_DATA_BATCHES.value))
    return result

  result = cli.run_or_exit(measure)
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
