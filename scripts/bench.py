"""Benchmarks a config's train step: python scripts/bench.py --config=configs/NAME.py [--aot]

Prints one JSON line: tokens/s, step time, MFU (PaLM formula; `mfu_causal` counts only
the causal half of attention), TFLOP/s, compile time, per-device memory, and the input
pipeline's own tokens/s (over at least --data_seconds). `--aot` compiles for the config's
mesh from shapes alone; `--aot --quantize=int8|int4` (or `--aot --inference` for the
float weights) plans the scoring step of the model with its weights quantised instead
(lm/eval/quantize.py), with "param_bytes_per_device".

`--checkpoint` times saving and restoring the train state instead (and the checksums'
share of it). `--vary=KEY=V1,V2` (repeatable) measures the config, then each value of
each key on its own, one JSON line each with a "variant" label: every lever both ways in
one process. `--vary='KEY=V;KEY2=V2'` sets its keys together, as one variant.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from lm.cli import define_quantize_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_AOT = flags.DEFINE_bool('aot', False, 'Compile without running: memory and FLOPs only.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
_DATA_BATCHES = flags.DEFINE_integer('data_batches', 20,
                                     'Fewest batches for data_tokens_per_sec; 0 skips it.')
_DATA_SECONDS = flags.DEFINE_float(
    'data_seconds', 5.0, 'Fewest seconds for data_tokens_per_sec, so that tokenising (a '
    'chunk of documents at a time, ahead of the batches) is inside the measurement.')
_CHECKPOINT = flags.DEFINE_bool(
    'checkpoint', False, 'Time saving and restoring the train state instead, and what the '
    'checkpoint checksums cost of it.')
_INFERENCE = flags.DEFINE_bool(
    'inference', False, 'With --aot: plan the scoring step (forward and NLL) instead of the '
    'train step, its weights quantised as --quantize says; int8/int4 imply it.')
_QUANTIZE = define_quantize_flags()
_VARY = flags.DEFINE_multi_string(
    'vary', [], 'KEY=V1,V2,...: also measure the config with KEY set to each value; '
    "'KEY=V;KEY2=V2': one variant with both set.")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from lm import cli
  from lm.eval.quantize import QuantConfig
  from lm.experiments import bench  # After flag parsing, so --help stays fast.

  cli.reject_extra_args(argv)
  if _CHECKPOINT.value:
    print(json.dumps(cli.run_or_exit(lambda: bench.checkpoint_timing(_CONFIG.value))))
    return

  quant = QuantConfig(*_QUANTIZE())
  if (_INFERENCE.value or quant.on) and not _AOT.value:
    cli.fail('--inference and --quantize go with --aot')

  def measure(config, data_too):
    if _AOT.value and (_INFERENCE.value or quant.on):
      return bench.plan_inference(config, quant)
    if _AOT.value:
      return bench.run_aot(config)
    result = bench.run_steps(config, steps=_STEPS.value, warmup=_WARMUP.value)
    if _DATA_BATCHES.value and data_too:
      result.update(bench.data_throughput(config, batches=_DATA_BATCHES.value,
                                          seconds=_DATA_SECONDS.value))
    return result

  if not _VARY.value:
    print(json.dumps(cli.run_or_exit(lambda: measure(_CONFIG.value, True))))
    return
  runs = cli.run_or_exit(lambda: bench.variants(_CONFIG.value, _VARY.value))
  failed = 0
  for i, (label, config) in enumerate(runs):
    # The pipeline is measured again only where the variant changes what it produces.
    data_too = i == 0 or any(config[k] != runs[0][1][k]
                             for k in ('data', 'batch_size', 'seq_len', 'seed'))
    try:
      result = measure(config, data_too)
    except Exception as e:  # noqa: BLE001 - one variant failing (say, out of memory)
      failed += 1           # must not cost the others their measurement.
      result = {'error': ' '.join(str(e).split())[:500]}
    # The allocator's peak covers the whole process: only the first run owns it.
    if i:
      result.pop('peak_bytes_in_use', None)
    print(json.dumps({'variant': label, **result}), flush=True)
  if failed:
    cli.fail(f'{failed} of {len(runs)} variants failed; see their "error"')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  from lm import cli
  app.run(main, flags_parser=cli.parse_flags)
