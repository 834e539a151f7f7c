"""Checkpoint checksums: every single flipped bit changes them; the mesh does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lm.run import checksums


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8])
def test_every_single_bit_flip_changes_the_checksum(dtype):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, 5)) * 100).astype(dtype)
  clean = checksums.of_arrays({'x': x})
  raw = x.reshape(-1).view(np.uint8).copy()
  for byte in range(raw.size):
    for bit in range(8):
      flipped = raw.copy()
      flipped[byte] ^= np.uint8(1 << bit)
      flipped = flipped.view(x.dtype).reshape(x.shape)
      assert checksums.of_arrays({'x': flipped}) != clean, (byte, bit)


def test_swapped_values_change_the_checksum():
  x = np.arange(16, dtype=np.float32)
  swapped = x.copy()
  swapped[[3, 11]] = swapped[[11, 3]]
  assert checksums.of_arrays(x) != checksums.of_arrays(swapped)


def test_the_checksum_does_not_depend_on_the_sharding():
  mesh = jax.make_mesh((4, 2), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (8, 6, 4)), np.float32)
  expected = checksums.of_arrays({'w': x})
  for spec in (PartitionSpec('a', 'b'), PartitionSpec(None, 'b', 'a'), PartitionSpec()):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert checksums.of_arrays({'w': sharded}) == expected, spec


def test_mismatches_name_the_array_and_skip_a_changed_dtype():
  state = {'a': np.ones(4, np.float32), 'b': np.zeros(3, np.float32)}
  saved = checksums.make(state, {'data': {'position': 3}})
  assert checksums.mismatches(saved, state, {'data': {'position': 3}}) == []
  bad = {**state, 'b': np.array([0, 1, 0], np.float32)}
  assert checksums.mismatches(saved, bad, {'data': {'position': 4}}) == ["['b']", 'data']
  # Restored in bfloat16 (a resume may change model.param_dtype): not comparable.
  cast = {**state, 'a': state['a'].astype(jnp.bfloat16)}
  assert checksums.mismatches(saved, cast) == []
