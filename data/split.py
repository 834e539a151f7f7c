"""The train / held-out split, decided per document by a stable hash of its key."""

import hashlib


def is_heldout(key: str, fraction: float) -> bool:
  """True for about `fraction` of keys, the same ones on every machine and run.

  Python's hash() is salted per process, so a cryptographic digest is used instead.
  """
  if fraction <= 0.0:
    return False
  digest = hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64 < fraction
