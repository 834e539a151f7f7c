"""Samples from a trained run: python scripts/generate.py --workdir=RUN --prompt=TEXT
[--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]
[--quantize=int8|int4] [--benchmark]

Prints the generated text, then as the last line JSON {"prompt_ids", "ids", "text"}
(--quantize adds "quantize" and "param_bytes_per_device"); --benchmark adds
"tokens_per_sec", timed on a second identical generation once the first has compiled.
--temperature=0 is greedy.
"""

import json
import sys

from absl import app, flags, logging

from lm.cli import define_quantize_flags, define_run_flags

_WORKDIR, _STEP = define_run_flags()
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BENCHMARK = flags.DEFINE_bool('benchmark', False, 'Generate twice and report the second '
                               'run\'s new tokens per second (the first one compiles).')
_QUANTIZE = define_quantize_flags()


def main(argv):
  logging.set_verbosity(logging.ERROR)
  from lm import cli  # After flag parsing, so --help stays fast.
  from lm.eval import quantize, sampling

  cli.reject_extra_args(argv)

  def complete():
    cfg = sampling.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                  top_k=_TOP_K.value, top_p=_TOP_P.value)
    cfg.validate()
    run = quantize.load_quantized_run(_WORKDIR.value, _STEP.value,
                                      quantize.QuantConfig(*_QUANTIZE()))
    out = sampling.complete(run, _PROMPT.value, cfg, _SEED.value, timed=_BENCHMARK.value)
    past = sampling.past_training(run.cfgs.model, run.cfgs.run.seq_len,
                                  len(out['prompt_ids']) + len(out['ids']))
    if past:
      print(f'warning: {past}', file=sys.stderr)
    return {**out, **quantize.weights_record(run)}

  result = cli.run_or_exit(complete)
  print(_PROMPT.value + result['text'])
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
