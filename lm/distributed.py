"""Starting JAX's multi-controller runtime: explicit flags, or a detected cluster."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def detected_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process launcher this job runs under, or None for a single process.

  Only launchers with more than one process count: a one-task SLURM allocation or a
  single TPU VM trains fine without the distributed runtime.
  """
  env = os.environ if env is None else env
  if int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1')) or 1) > 1 and 'SLURM_JOB_ID' in env:
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'openmpi'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_seconds: int = 100) -> str | None:
  """Calls `jax.distributed.initialize` when asked to or when a cluster is detected.

  A process that stops answering for `heartbeat_timeout_seconds` ends the whole job
  rather than leaving the others hanging in a collective.
  Returns how the runtime was started ('flags', a cluster name) or None (one process).
  """
  if coordinator_address or num_processes:
    if not (coordinator_address and num_processes is not None and process_id is not None):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return 'flags'
  cluster = detected_cluster()
  if cluster:
    # JAX reads the launcher's environment itself.
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  return cluster


def barrier(name: str) -> None:
  """Waits until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([blob.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes)]


def shutdown() -> None:
  """Ends the distributed runtime: a rendezvous of every process; collectives fail after.

  A job that stops on an error every process agreed on calls it before exiting: process
  0 holds the coordination service, and a process still connected when it leaves is
  killed by the runtime before it can say why it stopped.
  """
  if jax.process_count() > 1:
    jax.distributed.shutdown()
