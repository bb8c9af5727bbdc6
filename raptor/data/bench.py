"""How fast the loader turns shards into augmented batches, and how that compares with a bare loop.

The bare loop is the floor any loader pays: torchvision's ``decode_jpeg`` + ``RandomResizedCrop``
(bicubic) + flip over the same JPEG bytes, already in memory, one thread. The loader's figure adds
what a real reader does (tar parsing, labels, shuffling, batching, error accounting).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from raptor.data import tarstream
from raptor.data.settings import LoaderSettings
from raptor.data.decode import JPEG_EXTS
from raptor.data.gopen import open_shard
from raptor.data.streaming import loader
from raptor.errors import UserError


def bench(
    url: str,
    settings: LoaderSettings,
    *,
    image_size: int = 224,
    batches: int = 20,
    train: bool = True,
    device: str | None = None,
    normalize: bool = False,
    bare: bool = False,
    split: str | None = None,
) -> dict[str, Any]:
    """Samples/s of the loader with ``settings``, timed from the first batch (worker start-up excluded).

    Each worker runs single-threaded, as DataLoader workers do, so the figure multiplies by the
    number of loader workers a machine can spare. ``num_workers=0`` runs the reader in this
    process, also on one thread. ``normalize`` includes the float normalisation, which the
    loader otherwise leaves to the training device; GPU decoding times decoding on ``device``
    in this process. ``bare`` adds the bare loop's img/s over as many of the shards' JPEGs and
    the ratio of the two (per worker). Bad samples are counted, never fatal (error budget 1).
    """
    settings = settings.updated(error_budget=1.0)
    num_workers, decode = settings.num_workers, settings.decode
    stream = loader(url, settings, image_size=image_size, train=train, steps_per_epoch=batches + 1, rank=0,
                    world_size=1, split=split, device=device, normalize=normalize)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        it = iter(stream)
        next(it)
        _sync(stream.device)
        t0 = time.perf_counter()
        count = sum(len(images) for images, *_ in it)
        _sync(stream.device)
        elapsed = time.perf_counter() - t0
        rate = count / elapsed
        result: dict[str, Any] = {
            "url": url,
            "image_size": image_size,
            "train": train,
            "decode": decode,
            "device": str(stream.device),
            "normalize": normalize,
            "samples": count,
            "seconds": round(elapsed, 3),
            "samples_per_s": round(rate, 1),
            "samples_per_s_per_worker": round(rate / max(num_workers, 1), 1),
            "num_workers": num_workers,
            **{f"stats_{k}": v for k, v in stream.stats.as_dict().items()},
        }
        if bare:
            jpegs = _jpegs(stream.stream.shards.urls, count)
            result["bare_samples_per_s"] = round(bare_loop(jpegs, image_size), 1)
            result["ratio_per_worker"] = round(
                result["samples_per_s_per_worker"] / result["bare_samples_per_s"], 3
            )
    finally:
        torch.set_num_threads(threads)
    return result


def bare_loop(jpegs: list[bytes], image_size: int) -> float:
    """img/s of decode_jpeg + RandomResizedCrop (bicubic) + flip over ``jpegs``, one thread."""
    augment = v2.Compose([
        v2.RandomResizedCrop(image_size, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
    ])
    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    t0 = time.perf_counter()
    for t in tensors:
        augment(decode_jpeg(t))
    return len(tensors) / (time.perf_counter() - t0)


def _jpegs(urls: list[str], count: int) -> list[bytes]:
    """The first ``count`` JPEGs of the shards, in memory."""
    out: list[bytes] = []
    for url in urls:
        with open_shard(url) as stream:
            for sample, _ in tarstream.samples(stream, url):
                ext = next((e for e in JPEG_EXTS if e in sample), None)
                if ext:
                    out.append(sample[ext])
                if len(out) == count:
                    return out
    if not out:
        raise UserError(f"{urls[0]}...: no JPEG images for the bare loop")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
