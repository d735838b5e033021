"""Multi-process start-up: ``jax.distributed.initialize`` from flags or env.

On TPU pod slices, SLURM and other clusters JAX detects the coordinator, the
process count and the process id by itself: pass ``--distributed`` (or set
``SYNSTRIP_DISTRIBUTED=1``). Elsewhere give them explicitly with
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or the
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
environment variables). Without any of these the run is single-process.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from absl import flags

_FLAGS_DEFINED = False


def define_flags() -> None:
  """Define ``--distributed``, ``--coordinator_address``, ``--num_processes``,
  ``--process_id`` and ``--local_device_ids`` (idempotent)."""
  global _FLAGS_DEFINED  # pylint: disable=global-statement
  if _FLAGS_DEFINED:
    return
  flags.DEFINE_bool("distributed", False,
                    "call jax.distributed.initialize() with auto-detection "
                    "(TPU pods, SLURM, ...)")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0's coordinator")
  flags.DEFINE_integer("num_processes", None, "total number of processes")
  flags.DEFINE_integer("process_id", None, "this process's id, 0-based")
  flags.DEFINE_string("local_device_ids", None,
                      "comma-separated local device ids of this process")
  flags.DEFINE_integer("distributed_timeout", None,
                       "seconds to wait for peers at start-up and before a "
                       "silent peer is declared dead (JAX's defaults: 300 "
                       "and 100)")
  _FLAGS_DEFINED = True


def _env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def initialize(*, auto: bool = False, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[list[int]] = None,
               timeout_s: Optional[int] = None) -> bool:
  """Start JAX's multi-process runtime if asked to; return whether it did.

  Explicit arguments win over ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``. Must run before any other JAX
  call that touches devices. ``timeout_s`` bounds the wait for peers at
  start-up and the heartbeat timeout after which the survivors of a dead
  process stop (with an error) instead of waiting forever.

  Raises:
    ValueError: an incomplete explicit set-up (names the missing value).
  """
  coordinator_address = (coordinator_address
                         or os.environ.get("JAX_COORDINATOR_ADDRESS"))
  num_processes = (num_processes if num_processes is not None
                   else _env_int("JAX_NUM_PROCESSES"))
  process_id = process_id if process_id is not None else _env_int(
      "JAX_PROCESS_ID")
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    missing = [n for n, v in zip(("coordinator_address", "num_processes",
                                  "process_id"), explicit) if v is None]
    if missing:
      raise ValueError(f"multi-process set-up is missing {missing} "
                       f"(got coordinator_address={coordinator_address!r}, "
                       f"num_processes={num_processes!r}, "
                       f"process_id={process_id!r})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is outside "
                       f"[0, num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id,
                               local_device_ids=local_device_ids,
                               **_timeouts(timeout_s))
    return True
  if auto or os.environ.get("SYNSTRIP_DISTRIBUTED") == "1":
    jax.distributed.initialize(**_timeouts(timeout_s))
    return True
  return False


def _timeouts(timeout_s: Optional[int]) -> dict[str, int]:
  if timeout_s is None:
    return {}
  if timeout_s < 1:
    raise ValueError(f"distributed timeout must be >= 1 s, got {timeout_s}")
  return {"initialization_timeout": timeout_s,
          "heartbeat_timeout_seconds": timeout_s,
          "shutdown_timeout_seconds": timeout_s}


def initialize_from_flags() -> bool:
  """:func:`initialize` with the values of the flags of :func:`define_flags`."""
  f = flags.FLAGS
  ids = f.local_device_ids
  return initialize(
      auto=f.distributed, coordinator_address=f.coordinator_address,
      num_processes=f.num_processes, process_id=f.process_id,
      local_device_ids=[int(i) for i in ids.split(",")] if ids else None,
      timeout_s=f.distributed_timeout)


def is_main() -> bool:
  """Whether this is process 0, the one that logs and writes the run's
  files (every process saves its checkpoint shards)."""
  return jax.process_index() == 0


__all__ = ["define_flags", "initialize", "initialize_from_flags", "is_main"]
