"""Benchmarks a config's train step: python scripts/bench.py --config=configs/NAME.py [--aot]

Prints one JSON line: tokens/s, step time, MFU (PaLM formula; `mfu_causal` counts only
the causal half of attention), TFLOP/s, compile time, per-device memory, and the input
pipeline's own tokens/s. `--aot` compiles for the config's mesh from shapes alone.

`--vary=KEY=V1,V2` (repeatable) measures the config, then each value of each key on its
own, one JSON line each with a "variant" label: every lever both ways in one process.
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
_VARY = flags.DEFINE_multi_string(
    'vary', [], 'KEY=V1,V2,...: also measure the config with KEY set to each value.')


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from lm import bench, cli  # After flag parsing, so --help stays fast.

  cli.reject_extra_args(argv)

  def measure(config):
    if _AOT.value:
      return bench.run_aot(config)
    result = bench.run_steps(config, steps=_STEPS.value, warmup=_WARMUP.value)
    if _DATA_BATCHES.value:
      result.update(bench.data_throughput(config, batches=_DATA_BATCHES.value))
    return result

  runs = cli.run_or_exit(lambda: bench.variants(_CONFIG.value, _VARY.value))
  for i, (label, config) in enumerate(runs):
    result = cli.run_or_exit(lambda config=config: measure(config))
    if _VARY.value:
      # The allocator's peak covers the whole process: only the first run owns it.
      if i:
        result.pop('peak_bytes_in_use', None)
      result = {'variant': label, **result}
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
