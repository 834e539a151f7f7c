"""Starting JAX's multi-controller runtime: explicit flags, or a detected cluster."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


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
               process_id: int | None = None) -> str | None:
  """Calls `jax.distributed.initialize` when asked to or when a cluster is detected.

  Returns how the runtime was started ('flags', a cluster name) or None (one process).
  """
  if coordinator_address or num_processes:
    if not (coordinator_address and num_processes is not None and process_id is not None):
      raise ValueError('--coordinator_address, --num_processes and --process_id go together')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return 'flags'
  cluster = detected_cluster()
  if cluster:
    jax.distributed.initialize()  # JAX reads the launcher's environment itself.
  return cluster
