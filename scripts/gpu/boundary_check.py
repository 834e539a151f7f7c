"""Does any logit of a packed row's second document depend on its first document?

  python scripts/gpu/boundary_check.py --workdir=RUN [--attention=auto,xla] [--control]

Builds the model from a run folder (its config and latest parameters), packs two
documents of random tokens into one row with segment ids [1]*L1 + [2]*L2, then replaces
document 1's tokens by other random tokens and measures how much document 2's logits
move ("leak"; 0 when the document mask holds) next to how much document 1's own logits
move ("effect", proof that the change reached the model). It also compares document 2's
logits with those of document 2 scored alone from position 0 ("alone"), which the mask
and the restarted RoPE positions together should make equal up to rounding.

--control runs the same measurement with the segment ids left out, as if the mask were
dropped: there document 2 must depend on document 1, or the check could not fail.

Prints one JSON line per attention implementation (and per control), then a last line
{"ok": bool, ...}; exits 1 when a check or the control does not hold.
"""

import json
import sys

import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run folder with a checkpoint.')
_ATTENTION = flags.DEFINE_list('attention', ['auto'], "model.attention values to check "
                               "('auto' = cuDNN on a GPU in 16-bit, else XLA).")
_LEN1 = flags.DEFINE_integer('len1', 64, 'Tokens of document 1.')
_LEN2 = flags.DEFINE_integer('len2', 64, 'Tokens of document 2.')
_CONTROL = flags.DEFINE_bool('control', True, 'Also measure without segment ids.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random documents.')
# Leak allowed, as a share of the largest |logit|. A held mask gives exactly 0 (masked
# scores become exact zeros after the softmax); one unit of bf16 rounding is ~4e-3.
_TOL = flags.DEFINE_float('tol', 1e-4, 'Largest leak, relative to max |logit|.')
_ALONE_TOL = flags.DEFINE_float('alone_tol', 0.0, 'Largest packed-vs-alone difference '
                                'relative to max |logit|; 0 = 1e-3 in float32, 5e-2 else.')


def measure(model, params, tokens, segments, perturbed, len1):
  import jax
  import jax.numpy as jnp

  @jax.jit
  def logits(p, t, s):
    return model.apply({'params': p}, t, segment_ids_BxT=s).astype(jnp.float32)

  base = np.asarray(logits(params, tokens, segments))
  moved = np.asarray(logits(params, perturbed, segments))
  alone = np.asarray(logits(params, tokens[:, len1:],
                            None if segments is None else segments[:, len1:]))
  scale = float(np.max(np.abs(base)))
  return {
      'scale': scale,
      'leak': float(np.max(np.abs(moved[:, len1:] - base[:, len1:]))) / scale,
      'effect': float(np.max(np.abs(moved[:, :len1] - base[:, :len1]))) / scale,
      'alone': float(np.max(np.abs(base[:, len1:] - alone))) / scale,
  }


def main(argv):
  del argv
  import dataclasses

  import jax
  import jax.numpy as jnp

  from lm.model import transformer as model_lib
  from lm.run import folder

  run = folder.load_run(_WORKDIR.value)
  cfg = run.cfgs.model
  len1, len2 = _LEN1.value, _LEN2.value
  rng = np.random.default_rng(_SEED.value)
  # Ids 4 and up: the tokenizer's special ids (pad, unk, bos, eos) come first.
  low, high = 4, min(cfg.vocab_size, run.tokenizer.vocab_size)
  tokens = rng.integers(low, high, (1, len1 + len2), np.int32)
  perturbed = tokens.copy()
  perturbed[:, :len1] = rng.integers(low, high, (1, len1), np.int32)
  segments = np.concatenate([np.full((1, len1), 1, np.int32),
                             np.full((1, len2), 2, np.int32)], axis=1)
  dtype_is_32 = jnp.dtype(cfg.dtype).itemsize == 4
  alone_tol = _ALONE_TOL.value or (1e-3 if dtype_is_32 else 5e-2)
  ok = True
  results = []
  for setting in _ATTENTION.value:
    c = dataclasses.replace(cfg, attention=setting)
    model = model_lib.Transformer(c, None)  # One device: no sharding constraints.
    impl = model_lib.attention_impl(setting, c.dtype) or 'default'
    r = measure(model, run.params, tokens, segments, perturbed, len1)
    passed = r['leak'] <= _TOL.value and r['effect'] > _TOL.value and r['alone'] <= alone_tol
    ok &= passed
    results.append({'check': 'boundary', 'attention': setting, 'impl': impl,
                    'backend': jax.default_backend(), 'dtype': cfg.dtype, 'step': run.step,
                    'ok': passed, **r})
    print(json.dumps(results[-1]), flush=True)
    if _CONTROL.value:
      r = measure(model, run.params, tokens, None, perturbed, len1)
      passed = r['leak'] > _TOL.value  # The check above would have failed here.
      ok &= passed
      results.append({'check': 'boundary_control', 'attention': setting, 'impl': impl,
                      'backend': jax.default_backend(), 'dtype': cfg.dtype,
                      'step': run.step, 'ok': passed, **r})
      print(json.dumps(results[-1]), flush=True)
  print(json.dumps({'ok': ok, 'tol': _TOL.value, 'alone_tol': alone_tol,
                    'len1': len1, 'len2': len2, 'results': results}))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
