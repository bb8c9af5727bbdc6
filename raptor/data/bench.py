"""How fast one loader worker turns shards into augmented batches (decode + transform)."""

from __future__ import annotations

import time
from typing import Any

import torch

from raptor.data.loader import loader


def bench(
    url: str,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    batches: int = 20,
    num_workers: int = 1,
    train: bool = True,
) -> dict[str, Any]:
    """Samples/s per loader worker, timed from the first batch (worker start-up excluded).

    Each worker runs single-threaded, as DataLoader workers do, so the figure multiplies by the
    number of loader workers a machine can spare. ``num_workers=0`` runs the reader in this
    process, also on one thread.
    """
    stream = loader(
        url,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        num_workers=num_workers,
        batches_per_epoch=batches + 1,
        rank=0,
        world_size=1,
        error_budget=1.0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        it = iter(stream)
        next(it)
        t0 = time.perf_counter()
        count = sum(len(images) for images, *_ in it)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    rate = count / elapsed
    return {
        "url": url,
        "image_size": image_size,
        "train": train,
        "samples": count,
        "seconds": round(elapsed, 3),
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(num_workers, 1), 1),
        "num_workers": num_workers,
        **{f"stats_{k}": v for k, v in stream.stats.as_dict().items()},
    }
