"""Checksums of a checkpoint's arrays and JSON, so flipped bits are caught on restore.

Orbax reports truncated and missing files, but a bit flipped inside a stored array is
restored without a word. Each checkpoint therefore carries, in its `checksums` item,
two 32-bit wrapping sums per array, computed on the devices:

  plain     sum of the array's bits read as unsigned integers
  weighted  sum of the same words times their (1-based) flat position

Integer addition modulo 2**32 is exact and order-free, so the sums do not depend on the
mesh or on how XLA splits the reduction: a checkpoint saved on 8-way FSDP verifies after
a restore onto one device. One flipped bit changes one word by +-2**k (k < 32), which
always changes the plain sum; the weighted sum also catches swapped words. The JSON items
are covered by the sha256 of their canonical text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 1


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (narrower types widened, wider ones split)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2.


@jax.jit
def _sums(x: jax.Array) -> jax.Array:
  words = _words(x)
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
        stride % (1 << 32))
    stride *= words.shape[axis]
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (position + np.uint32(1)), dtype=jnp.uint32)])


def of_arrays(tree: Any) -> dict[str, list[str]]:
  """{key path: [dtype, 'plain-weighted' in hex]} for every array leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # One small program per distinct shape, dtype and sharding (the layers of a model share
  # them), rather than one over the whole tree: that took 13 s to compile for GPT-2 small.
  # Each is fetched before the next starts: many programs with collectives in flight at
  # once can deadlock the CPU backend's simulated devices.
  sums = [np.asarray(_sums(leaf)) for _, leaf in leaves]
  return {jax.tree_util.keystr(path): [str(leaf.dtype), f'{int(s[0]):08x}-{int(s[1]):08x}']
          for (path, leaf), s in zip(leaves, sums)}


def of_json(obj: Any) -> str:
  """sha256 of the canonical JSON text of `obj`."""
  text = json.dumps(obj, sort_keys=True, separators=(',', ':'), allow_nan=True)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def make(state: Any, json_items: dict[str, Any]) -> dict[str, Any]:
  """The `checksums` item for a train state and the JSON items saved beside it."""
  return {'version': VERSION, 'arrays': of_arrays(state),
          'json': {name: of_json(value) for name, value in json_items.items()}}


def mismatches(saved: dict[str, Any], state: Any | None = None,
               json_items: dict[str, Any] | None = None) -> list[str]:
  """Names of the restored arrays and JSON items whose checksums differ from `saved`.

  An array restored in another dtype than it was saved in (a resume may change
  `model.param_dtype`) was converted on the way and cannot be compared; it is skipped.
  """
  bad = []
  if state is not None:
    expected = saved.get('arrays', {})
    for key, (dtype, sums) in of_arrays(state).items():
      if key in expected and expected[key][0] == dtype and expected[key][1] != sums:
        bad.append(key)
  for name, value in (json_items or {}).items():
    digest = saved.get('json', {}).get(name)
    if digest is not None and digest != of_json(value):
      bad.append(name)
  return bad
