"""Checkpoints are verified before they are trusted: checksums written at save time, weights-only loads.

Every rank writes ``checksums_rank{r}.json`` into the folder it hands Ray (the sha256 of each file
it wrote, the step, the world size) after its other files; Ray merges the ranks' folders into one
checkpoint. :func:`verify` checks every file of every rank against them, so a
truncated or bit-flipped shard, a file missing from a half-finished upload, or a file replaced after
the fact is found before DeepSpeed reads anything, and the restore moves on to the previous
checkpoint with a warning naming the file (``raptor.train.checkpoint``).

Checkpoint files are read with :func:`load_weights_only`, so a planted pickle is refused instead
of executed, even when its checksum was forged too. DeepSpeed itself reads its own shards (the
checkpoints of an older raptor) with ``torch.load(weights_only=False)``, which runs whatever a
pickle asks for: :func:`weights_only_loads` swaps the engine's checkpoint reader for one that loads
with ``weights_only=True`` and allows only the few DeepSpeed types its optimizer state holds.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch

from raptor import storage

CHECKSUMS = "checksums_rank{rank}.json"
_CHECKSUMS_PREFIX = "checksums_rank"


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not name.startswith(_CHECKSUMS_PREFIX):
                out.append(rel)
    return sorted(out)


def write_checksums(folder: str, *, rank: int, world_size: int, step: int) -> None:
    """Record the sha256 of every file this rank wrote into ``folder`` (call it last, before reporting)."""
    record = {"step": step, "rank": rank, "world_size": world_size,
              "files": {rel: storage.checksum(os.path.join(folder, rel)) for rel in _files(folder)}}
    with open(os.path.join(folder, CHECKSUMS.format(rank=rank)), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def verify(folder: str) -> str | None:
    """``None`` when the checkpoint in ``folder`` is whole; else what is wrong, naming the file."""
    first = CHECKSUMS.format(rank=0)
    if not os.path.exists(os.path.join(folder, first)):
        return f"{first} is missing (a checkpoint from an older raptor, or a half-finished upload)"
    try:
        with open(os.path.join(folder, first)) as f:
            records = [(first, json.load(f))]
        world = int(records[0][1]["world_size"])
        for rank in range(1, world):
            name = CHECKSUMS.format(rank=rank)
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                return f"{name} is missing (a half-finished upload)"
            with open(path) as f:
                records.append((name, json.load(f)))
    except (ValueError, KeyError, TypeError) as e:
        return f"its checksum records do not parse ({type(e).__name__}: {e})"
    steps = {int(r["step"]) for _, r in records}
    if len(steps) != 1:
        return f"its ranks' checksum records name different steps {sorted(steps)}"
    for name, record in records:
        for rel, digest in record["files"].items():
            path = os.path.join(folder, rel)
            if not os.path.exists(path):
                return f"{rel} is missing (listed in {name})"
            if storage.checksum(path) != digest:
                return f"{rel} fails its sha256 from {name} (truncated, corrupted or replaced)"
    return None


def _deepspeed_types() -> list[Any]:
    """The non-tensor types DeepSpeed pickles into its model and optimizer states (ZeRO 0-3, offload, fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's state types allowed; a refusal names the file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise pickle.UnpicklingError(
            f"{os.path.basename(path)} is not plain weights; refused by torch.load(weights_only=True) {detail.strip()}") from None


def weights_only_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file with :func:`load_weights_only`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with weights_only=True (saving is unchanged)."""

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
