"""What a worker prints: raptor's own lines, marked for the driver's console; everything else is chatter.

Ray forwards every line a worker prints to the driver. The driver (``raptor.console``)
shows the lines that carry its mark (rank 0's progress, any rank's warnings) and files the
rest (DeepSpeed's and Ray Train's own messages, prints of the libraries) in the run's log.
"""

from __future__ import annotations

import logging
import sys

import ray.train

from raptor.console import WORKER_FORMAT


def quiet_worker() -> None:
    """Route the ``raptor`` loggers of this worker to stdout, marked: rank 0 at INFO, others at WARNING."""
    rank = ray.train.get_context().get_world_rank()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger = logging.getLogger("raptor")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
