"""Reading samples out of shards, where bad data is met: skipped, counted and logged, never silent.

Two kinds of damage are survivable: a sample that does not decode (corrupt JPEG, missing label) and
a shard that ends early (truncated or corrupt tar; the samples it should still have held, known
from ``_info.json``, count as skipped). A shard that cannot be opened at all is not survivable: it
is retried with backoff (:func:`raptor.data.gopen.open_shard`), then the run fails naming it.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from raptor.data.gopen import open_shard
from raptor.data.sources import IMAGE_EXTS

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """Counters the training loop logs; one per reader, summed by :class:`ShardLoader`."""

    seen: int = 0  # samples taken from shards, good or bad
    skipped: int = 0  # bad samples dropped: undecodable, unlabelled, or lost in a truncated shard
    shard_errors: int = 0  # shards that ended early (truncated or corrupt tar)
    repeated: int = 0  # samples read again because this reader's shards ran short of its quota

    def add(self, other: "DataStats | dict[str, int]") -> None:
        values = other if isinstance(other, dict) else asdict(other)
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ErrorBudgetExceeded(RuntimeError):
    """More samples were bad than the error budget allows: the data is broken, stop the run."""


@dataclass
class Reader:
    """One reader's view: who it is (for logs), its counters and its error budget."""

    where: str  # "rank R worker W", for log lines
    budget: float  # allowed fraction of bad samples
    expected: int  # samples this reader should take this epoch (the budget's floor)
    num_classes: int | None
    retries: int
    backoff_s: float
    stats: DataStats

    def bad(self, count: int, message: str) -> None:
        """Count ``count`` skipped samples; stop once they exceed the budget."""
        self.stats.skipped += count
        log.warning("%s: %s", self.where, message)
        allowed = self.budget * max(self.stats.seen, self.expected)
        if self.stats.skipped > allowed:
            raise ErrorBudgetExceeded(
                f"{self.where}: {self.stats.skipped} of {self.stats.seen} samples were bad, "
                f"over the error budget of {self.budget:.1%} (last: {message})"
            )

    def samples(self, url: str, expected: int | None) -> Iterator[dict[str, Any]]:
        """The raw samples (``__key__``, ``__url__``, entries as bytes) of one shard."""
        stream = open_shard(url, retries=self.retries, backoff_s=self.backoff_s)
        count = 0
        try:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
            for sample in wds.tariterators.group_by_keys(files):
                count += 1
                self.stats.seen += 1
                yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            lost = max((expected or 0) - count, 1)
            self.stats.seen += lost
            self.stats.shard_errors += 1
            self.bad(lost, f"shard {url} is truncated or corrupt after {count} samples "
                           f"({type(e).__name__}: {e}); skipping its remaining {lost}")
        finally:
            stream.close()

    def decode(
        self, sample: dict[str, Any], transform: Callable[..., Any], dense: bool
    ) -> tuple[torch.Tensor, ...] | None:
        """(image, label[, mask, depth]) after ``transform``, or None (counted) when it is bad."""
        try:
            return _decode(sample, transform, dense, self.num_classes)
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            self.bad(1, f"skipping sample {sample.get('__key__')} of {sample.get('__url__')}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None


def _decode(
    sample: dict[str, Any], transform: Callable[..., Any], dense: bool, num_classes: int | None
) -> tuple[torch.Tensor, ...]:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image entry")
    if "cls" not in sample:
        raise ValueError("no cls entry")
    label = int(sample["cls"])
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} outside 0..{num_classes}")
    image = tv_tensors.Image(decode_image(_bytes_tensor(sample[ext]), mode=ImageReadMode.RGB))
    label_t = torch.tensor(label)
    if not dense:
        return transform(image), label_t
    if "seg.png" not in sample or "depth.npy" not in sample:
        raise ValueError("dense sample needs seg.png and depth.npy")
    mask = decode_image(_bytes_tensor(sample["seg.png"]), mode=ImageReadMode.GRAY)
    depth = torch.from_numpy(np.load(io.BytesIO(sample["depth.npy"]))).float()[None]
    if mask.shape[-2:] != image.shape[-2:] or depth.shape[-2:] != image.shape[-2:]:
        raise ValueError("seg.png / depth.npy size differs from the image")
    image, mask, depth = transform(image, tv_tensors.Mask(mask), tv_tensors.Mask(depth))
    return image, label_t, mask[0].long(), depth[0].as_subclass(torch.Tensor)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
