"""Checkpoints of a training stage: DeepSpeed shards + client state, persisted by Ray Train.

Every rank writes its own DeepSpeed shard (ZeRO partitions of the optimizer state, and of the
parameters at stage 3) and its own RNG state into a local folder and calls ``ray.train.report``
with it; Ray merges the ranks' folders into one checkpoint under
``RunConfig(storage_path, name)`` (the stage's key folder in the store, which may be ``s3://``) and
keeps the newest ``CheckpointConfig(num_to_keep)``. Resuming is re-running the stage with the same
key: Ray Train V2 finds its snapshot there and hands the newest checkpoint back through
``ray.train.get_checkpoint()``.

Client state: the optimizer step (which fixes the LR and lambda schedules, both pure functions of
the step) and the number of micro-batches consumed (the data position; the loader's order is a
pure function of (seed, epoch, rank), so (epoch, offset) is enough to continue the same stream).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import torch

from raptor.train.job import CheckpointPlan

log = logging.getLogger(__name__)

_RNG_FILE = "rng_rank{rank}.pt"


@dataclass
class Resumed:
    """Where a stage continues: optimizer steps done and micro-batches consumed."""

    step: int = 0
    micro_batches: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's logged rows so far
    resumed_at: list[int] = field(default_factory=list)  # the step of every resume so far (the export records it)


def tag(step: int) -> str:
    return f"step{step:08d}"


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and tuples, so it reloads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores one stage's training state through Ray Train (every rank, collectively)."""

    def __init__(self, plan: CheckpointPlan, engine: Any):
        self.plan, self.engine = plan, engine
        self.rank = ray.train.get_context().get_world_rank()

    def due(self, step: int, last: bool) -> bool:
        return step % self.plan.interval == 0 or last

    def save(self, step: int, micro_batches: int, metrics: dict[str, float], resumed: Resumed) -> None:
        """Collective: every rank saves its shard + RNG and reports the folder (a Ray Train barrier).

        ``resumed`` carries rank 0's history and the steps it resumed at so far.
        """
        client = {"step": step, "micro_batches": micro_batches, "history": resumed.history, "resumed_at": resumed.resumed_at}
        with tempfile.TemporaryDirectory(prefix="raptor-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=tag(step), client_state=client)
            torch.save(_rng_state(), os.path.join(tmp, _RNG_FILE.format(rank=self.rank)))
            ray.train.report(
                {**metrics, "step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{tag(step)}",
            )
        if self.rank == 0:
            log.debug("checkpoint at step %d saved", step)

    def restore(self) -> Resumed:
        """Load the newest checkpoint of this stage into the engine (and this rank's RNG); step 0 if none."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Resumed()
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, "latest")) as f:
                latest = f.read().strip()
            _, client = self.engine.load_checkpoint(folder, tag=latest, load_optimizer_states=True, load_lr_scheduler_states=True)
            if client is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state under tag {latest!r}")
            rng = os.path.join(folder, _RNG_FILE.format(rank=self.rank))
            if os.path.exists(rng):
                _set_rng_state(torch.load(rng, weights_only=True))
            else:  # the world size grew: this rank starts from the seeded RNG
                log.warning("checkpoint %s has no RNG state for rank %d", checkpoint.path, self.rank)
        resumed = Resumed(int(client["step"]), int(client["micro_batches"]), list(client.get("history", [])),
                          [*client.get("resumed_at", []), int(client["step"])])
        if self.rank == 0:
            log.info("resumed from %s at step %d", checkpoint.path, resumed.step)
        return resumed
