"""One job over several processes (hosts): start-up, agreement on the config, preemption.

JAX runs multi-host jobs as one process per host (or per GPU), each running the same
program on its share of the devices; `jax.distributed.initialize` connects them through
a coordinator (process 0). This module holds what the entry point and the training loop
need on top of that:

* `initialize`: connects the processes (explicitly, or from the SLURM / TPU-pod
  environment) with bounded time-outs. A process that dies without a signal stops
  sending heartbeats; after ``heartbeat_timeout_s`` the coordination service reports it
  and the other processes terminate with "Terminating process because the JAX
  distributed service detected fatal errors ... The following tasks are unhealthy
  (stopped sending heartbeats)" instead of waiting forever in a collective.
* `check_same_config`: every process must run the same config; a run whose processes
  disagree stops at start and names the differing fields.
* `Preemption`: SIGTERM (what SLURM and TPU maintenance send) to *any* process makes
  *all* processes agree on one step boundary at which they save a checkpoint and stop.
  With several processes this is JAX's preemption sync service (the notice is shared
  through the coordinator, and every process sees it at the same step); in a single
  process it is a plain signal handler.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

_distributed = False


def looks_multihost() -> bool:
    """True when the SLURM or TPU-pod environment describes more than one process."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto",
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> bool:
    """Connects this process to the others; returns whether it did.

    Args:
      coordinator_address: ``host:port`` of process 0; with it, ``num_processes`` and
        ``process_id`` are required and the environment is not consulted.
      mode: without an address: ``"auto"`` connects when `looks_multihost`, ``"on"``
        always (JAX reads the cluster from the environment), ``"off"`` never.
      initialization_timeout_s: how long to wait for every process to join.
      heartbeat_timeout_s: after this long without a heartbeat from a process, the
        others stop with an error naming it.
    """
    global _distributed
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"multihost mode must be auto, on or off, got {mode!r}")
    timeouts = dict(initialization_timeout=int(initialization_timeout_s),
                    heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    elif mode == "on" or (mode == "auto" and looks_multihost()):
        jax.distributed.initialize(**timeouts)
    else:
        return False
    _distributed = True
    logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _broadcast_text(text: str) -> str:
    """Process 0's ``text`` on every process."""
    data = text.encode() if jax.process_index() == 0 else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode()


def check_same_config(config_json: str) -> None:
    """Raises ValueError on every process unless all processes run the same config.

    Compares a hash first (one small all-gather); on a mismatch each process compares its
    config with process 0's field by field, so the error names what differs.
    """
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(config_json.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differing = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if not differing:
        return
    from dalle_jax.checkpoint import diff_dicts

    reference = json.loads(_broadcast_text(config_json))
    mine = diff_dicts(reference, json.loads(config_json), names=("process 0", "this process"))
    detail = ("this process's config differs from process 0's:\n  " + "\n  ".join(mine)
              if mine else "see the logs of those processes for the differing fields")
    raise ValueError(f"processes {differing} run a config that differs from process 0's; "
                     f"{detail}")


class Preemption:
    """Turns SIGTERM into "save a checkpoint at the next agreed step and stop".

    Use as a context manager around the training loop and call `reached(step)` after
    every step with the step just finished; it returns True at the same step on every
    process once any of them was sent SIGTERM.
    """

    def __init__(self):
        self._requested = False
        self._old = None

    def __enter__(self) -> Preemption:
        # With a coordinator, JAX's preemption notifier already owns SIGTERM; replacing
        # its handler would keep the notice from reaching the other processes.
        if not _distributed:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, *_):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self._requested = True

    def reached(self, step: int) -> bool:
        if _distributed:
            if multihost_utils.reached_preemption_sync_point(int(step)):
                logging.warning("preemption notice: every process saves at step %d and stops",
                                step)
                self._requested = True
        return self._requested

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
