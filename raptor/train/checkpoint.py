"""Checkpoints of a training stage: the consolidated training state + each rank's RNG, persisted by Ray Train.

The ranks gather the whole training state (every trained parameter in fp32, both AdamW moments,
the step count and the LR schedule: :mod:`raptor.train.consolidated`), rank 0 writes it as one
file (``state.pt``), every rank writes its own RNG state, and every rank calls
``ray.train.report`` with its folder; Ray merges the ranks' folders into one checkpoint under
``RunConfig(storage_path, name)`` (the stage's key folder in the store, which may be ``s3://``) and
keeps the newest ``CheckpointConfig(num_to_keep)``. Resuming is re-running the stage with the same
key: Ray Train V2 finds its snapshot there and hands the newest checkpoint back through
``ray.train.get_checkpoint()``. Because the state is whole, not DeepSpeed's per-rank partitions,
a checkpoint made at N workers under ZeRO stage z resumes at M workers under ZeRO stage z'.
(Checkpoints written by DeepSpeed itself, by an older raptor, still resume at their own world size.)

When: every ``storage.checkpoint_interval`` steps and at the end, and at the first check
(``storage.preemption_check``) after Ray Train announces that a node of the worker group will be
preempted (``ray.train.get_preemption_info``: a spot reclaim, a Kubernetes drain), so a preemption
loses at most the steps after that checkpoint. Training goes on after it, as Ray recommends: when
the node goes, Ray Train restarts the group from it (an elastic group at the size the live nodes
allow). Periodic checkpoints upload in the background (``storage.upload``: async), the one before a
preemption before the next step, so it is in storage before the node can go.

Client state: the optimizer step, which fixes the LR and lambda schedules (both pure functions of
the step) and the data position (the global order of samples is a pure function of (seed, epoch),
whatever the world size: :func:`raptor.train.trainer.batches_from`).

Nothing is trusted unverified (``raptor.train.integrity``): each rank records the checksums of the
files it saved, and a restore that finds a checkpoint truncated, bit-flipped, half-uploaded or
holding a pickle that is not plain weights warns naming the file and falls back to the previous
checkpoint, all ranks together: the ranks agree before anything is loaded and again after, and
a checkpoint that failed on one rank after others loaded it puts every rank back to a fresh start.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import ray.train
import torch
from pyarrow.fs import FileSelector, FileType

from raptor.train import consolidated, integrity
from raptor.train.registered import CHECKPOINT_DIR
from raptor.train.settings import StorageSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

_RNG_FILE = "rng_rank{rank}.pt"
STATE_FILE = "state.pt"  # the consolidated training state and the client state, written by rank 0


@dataclass
class Resumed:
    """Where a stage continues: optimizer steps done, and what rank 0 carries across resumes."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's logged rows so far
    resumed_at: list[int] = field(default_factory=list)  # the step of every resume so far (the export records it)
    nonfinite: dict[str, int] = field(default_factory=dict)  # raptor.train.nonfinite.NonFiniteGuard's counters
    samples: int = 0  # training samples the optimizer steps so far took, over all ranks and resumes


def tag(step: int) -> str:
    return f"step{step:08d}"


def _older(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The checkpoints beside ``latest`` with an earlier step, newest first (the fallbacks)."""
    parent, name = os.path.split(latest.path.rstrip("/"))
    newest = int(m.group(1)) if (m := CHECKPOINT_DIR.match(name)) else None
    infos = latest.filesystem.get_file_info(FileSelector(parent, allow_not_found=True))
    steps = sorted((int(m.group(1)), info.path) for info in infos
                   if info.type == FileType.Directory and (m := CHECKPOINT_DIR.match(os.path.basename(info.path))))
    return [ray.train.Checkpoint(path, filesystem=latest.filesystem) for step, path in reversed(steps)
            if newest is None or step < newest]


def _everyone(ok: bool, device: torch.device) -> bool:
    """True on every rank when ``ok`` holds on every rank (a checkpoint is used by all ranks or by none).
    The flag lives on the training ``device``: NCCL reduces only CUDA tensors."""
    if not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0


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
    """Saves and restores one stage's training state through Ray Train (every rank, collectively).

    ``fresh()`` builds the stage's starting state on this rank (seeded RNG, the initial student, a
    new engine around it) and returns the engine: the checkpointer calls it once, and again to put
    every rank back to a fresh start when a checkpoint failed to load on some rank after others had
    loaded it, so ranks never continue from different states. ``student()`` is the student inside
    the current engine, whose parameters name the consolidated state.
    """

    def __init__(self, settings: StorageSettings, fresh: Callable[[], Any], student: Callable[[], Any]):
        self.settings, self.fresh, self.student = settings, fresh, student
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.noticed: set[str] = set()  # nodes whose preemption notice this group has checkpointed for
        self.preempting = False  # the next save is the one before a preemption: it uploads before training goes on
        self.engine = self._new_engine()

    def _new_engine(self) -> Any:
        engine = self.fresh()
        integrity.weights_only_loads(engine)
        return engine

    def due(self, step: int, last: bool) -> bool:
        """Whether ``step`` ends with a checkpoint: periodic, last, or the first check after a preemption notice.

        Every rank calls it at every step (the notice check is a collective that all ranks make together)."""
        return self._preempting(step) or step % self.settings.checkpoint_interval == 0 or last

    def _preempting(self, step: int) -> bool:
        """True once per newly announced preemption of a node that holds ranks of this group."""
        if step % self.settings.preemption_check:
            return False
        info = ray.train.get_preemption_info()  # collective
        nodes = set(info.preempted_node_to_ranks) - self.noticed if info is not None else set()
        if not nodes:
            return False
        self.noticed |= nodes
        if self.rank == 0:
            left = f"{(info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else "an unknown time"
            log.warning("node(s) %s (ranks %s) will be preempted in %s: checkpoint at step %d", ", ".join(sorted(nodes)),
                        info.preempted_ranks, left, step)
        self.preempting = True
        return True

    def save(self, step: int, metrics: dict[str, float], resumed: Resumed) -> None:
        """Collective: the ranks gather the whole state (rank 0 writes it), each saves its RNG and reports the folder.

        ``resumed`` carries rank 0's history and the steps it resumed at so far. The folder is
        uploaded in the background (``storage.upload``), except before a preemption; Ray Train deletes
        it once uploaded.
        """
        client = {"step": step, "history": resumed.history, "resumed_at": resumed.resumed_at,
                  "nonfinite": resumed.nonfinite, "samples": resumed.samples, "global_samples": int(self.engine.global_samples),
                  "skipped_steps": int(self.engine.skipped_steps), "world_size": self.world_size,
                  "zero_stage": int(self.engine.zero_optimization_stage())}
        state = consolidated.gather(self.engine, self.student())  # collective
        wait, self.preempting = self.settings.upload == "sync" or self.preempting, False
        tmp = tempfile.mkdtemp(prefix="raptor-ckpt-")
        try:
            if self.rank == 0:
                torch.save({"training": state, "client": client}, os.path.join(tmp, STATE_FILE))
            torch.save(_rng_state(), os.path.join(tmp, _RNG_FILE.format(rank=self.rank)))
            integrity.write_checksums(tmp, rank=self.rank, world_size=self.world_size, step=step)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{tag(step)}",
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC if wait else ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        if self.rank == 0:
            log.debug("checkpoint at step %d %s", step, "saved" if wait else "uploading")

    def restore(self, latest: ray.train.Checkpoint | None = None) -> Resumed:
        """Load the newest checkpoint every rank can use into the engine (and each rank's RNG); step 0 if none.

        ``latest``: the newest checkpoint (default: the one Ray Train hands back); older ones beside
        it are the fallbacks. For each, newest first, in two agreed phases: every rank checks the
        files (checksums, weights-only loads of what it will read) and the ranks go on only if all
        succeeded; then every rank loads, and if any failed, every rank is put back to a fresh start
        before the next one is tried. Any exception on one rank is caught and agreed on, so no rank
        waits alone in a collective and no two ranks continue from different states.
        """
        latest = ray.train.get_checkpoint() if latest is None else latest
        if latest is None:
            return Resumed()
        for checkpoint in [latest, *_older(latest)]:
            with contextlib.ExitStack() as stack:
                staged, problem = _attempt(lambda: self._stage(checkpoint, stack))
                if _everyone(problem is None, self.engine.device):
                    assert staged is not None
                    resumed, problem = _attempt(lambda: self._apply(*staged))
                    if _everyone(problem is None, self.engine.device):
                        assert resumed is not None
                        if self.rank == 0:
                            log.info("resumed from %s at step %d", checkpoint.path, resumed.step)
                        return resumed
                    self.engine = self._new_engine()  # some rank loaded it, another could not: all start afresh
            if problem is not None:
                log.warning("checkpoint %s not used (rank %d): %s; trying the previous one", checkpoint.path, self.rank, problem)
        log.warning("no usable checkpoint under %s; the stage starts from step 0", os.path.dirname(latest.path.rstrip("/")))
        return Resumed()

    def _stage(self, checkpoint: ray.train.Checkpoint, stack: contextlib.ExitStack) -> tuple[str, Any, Any]:
        """Phase 1, nothing loaded into the engine: (folder, the consolidated state or DeepSpeed's tag,
        this rank's RNG state) once every file passes its checksum and what this rank will read loads
        weights-only."""
        try:
            folder = stack.enter_context(checkpoint.as_directory())
        except FileNotFoundError as e:  # deleted from storage since Ray registered it
            raise _Unusable(f"it is gone from storage ({e})") from None
        problem = integrity.verify(folder)
        if problem is not None:
            raise _Unusable(problem)
        rng = os.path.join(folder, _RNG_FILE.format(rank=self.rank))
        rng_state = integrity.load_weights_only(rng) if os.path.exists(rng) else None
        if os.path.exists(os.path.join(folder, STATE_FILE)):
            return folder, integrity.load_weights_only(os.path.join(folder, STATE_FILE)), rng_state
        if not os.path.exists(os.path.join(folder, "latest")):
            raise _Unusable(f"it holds neither {STATE_FILE} nor a DeepSpeed checkpoint")
        with open(os.path.join(folder, "latest")) as f:  # DeepSpeed's own layout (an older raptor)
            latest = f.read().strip()
        # every .pt of the tag, as DeepSpeed will read them (it reads each rank's ZeRO shard on every rank)
        for path in sorted(glob.glob(os.path.join(folder, latest, "*.pt"))):
            integrity.load_weights_only(path)
        return folder, latest, rng_state

    def _apply(self, folder: str, saved: Any, rng_state: Any) -> Resumed:
        """Phase 2: the engine's and the RNG's state from the staged checkpoint."""
        if isinstance(saved, dict):
            try:
                consolidated.scatter(self.engine, self.student(), saved["training"])
            except ValueError as e:
                raise _Unusable(f"{STATE_FILE}: {e}") from None
            client = saved["client"]
            e = self.engine
            e.global_steps, e.global_samples = int(client["step"]), int(client["global_samples"])
            e.micro_steps, e.skipped_steps = e.global_steps * e.gradient_accumulation_steps(), int(client["skipped_steps"])
            if (client["world_size"], client["zero_stage"]) != (self.world_size, e.zero_optimization_stage()) and self.rank == 0:
                log.info("checkpoint of step %d: made at %d worker(s) under ZeRO-%d, resumed at %d under ZeRO-%d",
                         client["step"], client["world_size"], client["zero_stage"], self.world_size,
                         e.zero_optimization_stage())
        else:
            _, client = self.engine.load_checkpoint(folder, tag=saved, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if client is None:
                raise _Unusable(f"no DeepSpeed state under tag {saved!r}")
        if rng_state is not None:
            _set_rng_state(rng_state)
        else:  # the world size grew: this rank starts from the seeded RNG
            log.warning("checkpoint %s has no RNG state for rank %d", folder, self.rank)
        return Resumed(int(client["step"]), list(client.get("history", [])),
                       [*client.get("resumed_at", []), int(client["step"])], dict(client.get("nonfinite", {})),
                       int(client.get("samples", client["global_samples"])))


class _Unusable(Exception):
    """A checkpoint this rank cannot use; the message says why."""


def _attempt(call: Callable[[], T]) -> tuple[T | None, str | None]:
    """(result, None), or (None, what went wrong) for ANY exception: the other ranks must hear of it."""
    try:
        return call(), None
    except Exception as e:  # noqa: BLE001 - reported to every rank by the caller, never swallowed silently
        text = str(e).splitlines()[0] if str(e) else ""
        return None, text if isinstance(e, (_Unusable, pickle.UnpicklingError)) else f"{type(e).__name__}: {text}"
