"""The streaming reader every training worker uses: shards -> decoded, augmented batches.

Who reads what (non-resampled): the shard list is shuffled by (seed, epoch), dealt round-robin to
the ranks, and each rank's shards dealt round-robin to its DataLoader workers ("readers"). Every
rank yields exactly ``batches_per_epoch`` batches, split among its readers in proportion to their
samples; a reader whose shards run short reads them again (counted as ``repeated``), one with
extra stops early, so ranks never wait on each other at a collective. When the shards divide
evenly, every sample is seen exactly once per epoch across all ranks and readers. Resampled mode
draws shards with replacement instead (no notion of a pass, as open_clip's ``--dataset-resampled``).

Order and augmentation are a pure function of (seed, epoch, rank, world_size, num_workers): each
reader draws every crop from its own generator, in sample order, so a run repeats bit for bit
(resuming by skipping the batches already consumed) and another epoch gets another order.

Decoding (:mod:`raptor.data.decode`): ``decode="cpu"`` decodes and crops in the readers, which send
uint8 batches; ``decode="gpu"`` has them send the encoded JPEGs with their drawn crops, decoded in
the training process on ``device``. Either way the loader delivers images normalised on ``device``
(float32), or as uint8 with ``normalize=False``.

Error counts: each reader counts into its own :class:`DataStats` inside its worker process, and
sends the increments along with every batch; :class:`ShardLoader` strips them off in the training
process and adds them to ``loader.stats``. So the counts need no shared memory, and they are
exact for every batch the training loop has received.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from raptor.data.decode import Augment, EncodedBatch, LabelKey, cpu_item, decode_on_device, gpu_item
from raptor.data.formats import Shards
from raptor.data.reader import DataStats, ErrorBudgetExceeded, Reader, count_bad
from raptor.data.settings import LoaderSettings
from raptor.data.transforms import check_size, normalise_batch
from raptor.errors import UserError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit arguments, else torch.distributed (a Ray Train worker has it set up too), else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise UserError("pass both rank and world_size, or neither")
    if rank is None or world_size is None:
        rank, world_size = _context_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _context_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def split_quota(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` samples in proportion to ``weights`` by largest remainder."""
    if sum(weights) == 0:
        weights = [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    quota = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (quota[i] - exact[i], i))
    for i in order[: total - sum(quota)]:
        quota[i] += 1
    return quota


@dataclass
class ShardStream(IterableDataset):
    """The per-reader pipeline run inside each DataLoader worker (see the module docstring)."""

    shards: Shards
    rank: int
    world_size: int
    batch_size: int
    batches_per_epoch: int | None  # per rank; None: one exact pass with a final partial batch
    image_size: int
    train: bool
    shuffle: bool
    seed: int
    epoch: int
    resampled: bool
    dense: bool
    error_budget: float
    shuffle_buffer: int
    retries: int
    backoff_s: float
    crop_scale: tuple[float, float] = (0.08, 1.0)
    label_key: LabelKey = LabelKey("cls")
    decode: str = "cpu"

    def assignment(self, worker: int, num_workers: int) -> tuple[list[int], int | None]:
        """(shard indices, sample quota) of one reader this epoch; quota None: one exact pass."""
        n = len(self.shards.urls)
        if self.resampled:
            assert self.batches_per_epoch is not None  # loader() refuses resampled exact passes
            return list(range(n)), split_quota(self.rank_samples, [1] * num_workers)[worker]
        order = list(range(n))
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        mine = order[self.rank :: self.world_size]
        if len(mine) < num_workers:
            raise UserError(
                f"{n} shards cannot feed {self.world_size} rank(s) x {num_workers} loader "
                "worker(s): write more, smaller shards (max_samples), use fewer loader workers "
                "or resampled=True"
            )
        per_worker = [mine[w::num_workers] for w in range(num_workers)]
        if self.batches_per_epoch is None:
            return per_worker[worker], None
        weights = [sum(self.shards.counts[s] or 1 for s in shards) for shards in per_worker]
        return per_worker[worker], split_quota(self.rank_samples, weights)[worker]

    @property
    def rank_samples(self) -> int:
        """Samples this rank delivers per epoch: whole batches only."""
        assert self.batches_per_epoch is not None
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[tuple[Any | None, dict[str, int]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shard_ids, quota = self.assignment(worker, num_workers)
        if quota == 0 or not shard_ids:
            return
        slot_seed = _seed(self.seed, self.epoch, self.rank, self.world_size, worker, num_workers)
        if quota is None:
            expected = sum(self.shards.counts[s] or 0 for s in shard_ids)
        else:
            expected = quota
        reader = Reader(
            where=f"rank {self.rank} worker {worker}",
            budget=self.error_budget,
            expected=expected,
            num_classes=self.shards.num_classes,
            label_key=self.label_key,
            retries=self.retries,
            backoff_s=self.backoff_s,
            stats=DataStats(),
        )
        raw = self._raw(reader, shard_ids, random.Random(slot_seed), repeat=quota is not None)
        augment = Augment(self.image_size, self.train, self.crop_scale,
                          random.Random(_seed(slot_seed, "augment")))
        if self.decode == "gpu":
            make: Any = partial(gpu_item, augment=augment)
            collate: Any = partial(EncodedBatch.collate, size=self.image_size)
        else:
            make, collate = partial(cpu_item, augment=augment, dense=self.dense), _stack
        sent = DataStats()
        remaining = quota
        while remaining is None or remaining > 0:
            want = self.batch_size if remaining is None else min(self.batch_size, remaining)
            items = self._take(reader, raw, want, make)
            delta = {k: v - getattr(sent, k) for k, v in reader.stats.as_dict().items()}
            sent = replace(reader.stats)
            if not items:  # one exact pass is over: send the last counts on their own
                if any(delta.values()):
                    yield None, delta
                return
            if remaining is not None:
                remaining -= len(items)
            yield collate(items), delta

    def _take(self, reader: Reader, raw: Iterator[dict[str, Any]], want: int, make: Any) -> list[Any]:
        items: list[Any] = []
        for sample in raw:
            item = reader.item(sample, make)
            if item is not None:
                items.append(item)
                if len(items) == want:
                    break
        return items

    def _raw(
        self, reader: Reader, shard_ids: list[int], rng: random.Random, repeat: bool
    ) -> Iterator[dict[str, Any]]:
        """Samples of this reader's shards, pass after pass while ``repeat``.

        Each pass is shuffled through its own buffer, drained before the next pass starts, so a
        pass never leaks samples into another and one pass is exactly one copy of the shards.
        Resampled passes draw as many shards, with replacement.
        """
        passes = 0
        while True:
            if self.resampled:
                order = [rng.choice(shard_ids) for _ in shard_ids]
            else:
                order = list(shard_ids)
                if passes and self.shuffle:
                    rng.shuffle(order)
            samples = self._pass(reader, order, repeated=passes > 0 and not self.resampled)
            if self.shuffle and self.shuffle_buffer > 1:
                buffer = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
                samples = buffer(samples)
            good = reader.good
            yield from samples
            if not repeat:
                return
            if reader.good == good:  # another pass would not make one either: never loop forever
                raise ErrorBudgetExceeded(
                    f"{reader.where}: shards {[self.shards.urls[s] for s in order]} "
                    "hold no usable samples"
                )
            passes += 1

    def _pass(self, reader: Reader, order: list[int], repeated: bool) -> Iterator[dict[str, Any]]:
        for s in order:
            for sample in reader.samples(self.shards.urls[s], self.shards.counts[s]):
                if repeated:
                    reader.stats.repeated += 1
                yield sample


def _stack(items: list[tuple[torch.Tensor, ...]]) -> Batch:
    """Stack samples column by column (images stay uint8: a quarter of float's bytes to send)."""
    return tuple(torch.stack([item[i] for item in items]) for i in range(len(items[0])))


class ShardLoader:
    """Iterable of batches for one rank: ``(images [B,3,H,W], labels [B] long)``, plus
    ``masks [B,H,W] long`` and ``depth [B,H,W] float`` when dense, all on ``device``. Images are
    float32 normalised by ImageNet mean/std, or uint8 0..255 with ``normalize=False``.

    ``len(loader)`` is the number of batches per epoch (exact for every rank unless
    ``drop_last=False``); ``loader.set_epoch(e)`` before iterating picks the epoch's order;
    ``loader.stats`` holds the summed error counters of every batch received so far.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        pin_memory: bool,
        device: torch.device,
        normalize: bool = True,
    ):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.device, self.normalize = device, normalize
        self.stats = DataStats()
        for worker in range(max(num_workers, 1)):  # fail now, in the caller, on a bad split
            stream.assignment(worker, max(num_workers, 1))

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    @property
    def num_classes(self) -> int | None:
        return self.stream.shards.num_classes

    def __len__(self) -> int:
        if self.stream.batches_per_epoch is None:
            raise TypeError("drop_last=False: the number of batches is not fixed")
        return self.stream.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        data = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        yield from self._rebatch(data)

    def _rebatch(self, data: Iterable[tuple[Any | None, dict[str, int]]]) -> Iterator[Batch]:
        """Finish the readers' batches here (decode, move, normalise), merge their partial last
        batches, so only whole batches leave (but a final one when ``drop_last=False``), and add
        up the error counts riding along."""
        size = self.stream.batch_size
        parts: list[Batch] = []
        for raw, delta in data:
            self.stats.add(delta)
            if raw is None:
                continue
            batch = self._finish(raw)
            if len(batch[0]) == size and not parts:
                yield batch
                continue
            parts.append(batch)
            while parts and sum(len(p[0]) for p in parts) >= size:
                merged = tuple(torch.cat(column) for column in zip(*parts))
                yield tuple(t[:size] for t in merged)
                rest = tuple(t[size:] for t in merged)
                parts = [rest] if len(rest[0]) else []
        if parts:
            yield tuple(torch.cat(column) for column in zip(*parts))

    def _finish(self, raw: Batch | EncodedBatch) -> Batch:
        if isinstance(raw, EncodedBatch):
            images, failures = decode_on_device(raw, self.stream.image_size, self.device)
            labels = raw.labels.to(self.device, non_blocking=self.pin_memory)
            if failures:
                images, labels = self._undecodable(images, labels, failures)
            rest: tuple[torch.Tensor, ...] = (labels,)
        else:
            images, *others = (t.to(self.device, non_blocking=self.pin_memory) for t in raw)
            rest = tuple(others)
        if self.normalize:
            images = normalise_batch(images)
        elif images.dtype != torch.uint8:
            images = images.round_().to(torch.uint8)
        return (images, *rest)

    def _undecodable(
        self, images: torch.Tensor, labels: torch.Tensor, failures: list[tuple[int, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count images that decoded nowhere as skipped (within the error budget). A training
        epoch fills each one's row with another image of the batch (counted as repeated), so
        every rank still gets whole batches; one exact pass (``drop_last=False``) drops them."""
        where = f"rank {self.stream.rank} decoding on {self.device}"
        exact = self.stream.batches_per_epoch is None
        expected = (self.stream.shards.total or 0) if exact else self.stream.rank_samples
        for _, message in failures:
            count_bad(self.stats, 1, self.stream.error_budget, expected, where, f"skipping {message}")
        bad = {i for i, _ in failures}
        good = [i for i in range(len(labels)) if i not in bad]
        if exact:
            return images[good], labels[good]
        if not good:
            raise ErrorBudgetExceeded(f"{where}: no image of a batch of {len(labels)} decodes")
        for n, i in enumerate(sorted(bad)):
            j = good[n % len(good)]
            images[i], labels[i] = images[j], labels[j]
            self.stats.repeated += 1
        return images, labels


def loader(
    url: str,
    settings: LoaderSettings,
    *,
    image_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device | None = None,
    train: bool = True,
    shuffle: bool | None = None,
    epoch: int = 0,
    split: str | None = None,
    samples: int | None = None,
    dense: bool = False,
    drop_last: bool = True,
    batches_per_epoch: int | None = None,
    resampled: bool = False,
    patch_size: int | None = None,
    pin_memory: bool = False,
    normalize: bool = True,
    shuffle_buffer: int = 1000,
    retries: int = 3,
    backoff_s: float = 1.0,
) -> ShardLoader:
    """Stream batches for this rank from WebDataset shards at ``url`` (any fsspec URL).

    ``settings`` says how the shards are read (batch size, loader workers, seed, error budget,
    crop scale, class count, label key, where JPEGs are decoded; see
    :class:`~raptor.data.settings.LoaderSettings`); the keywords say what this call reads.
    ``url`` is a dataset folder (raptor's or timm's, with ``_info.json``, or any folder of
    ``.tar`` shards), a brace pattern of shards, or one shard; ``split`` picks a split of a timm
    dataset or a set of tars in a folder (see :mod:`raptor.data.formats`). ``samples`` states
    the total where no info file gives it (else it is counted once and cached).
    ``train`` selects the DINOv2 train transform (RandomResizedCrop over the settings' crop
    scale), else the eval transform; ``shuffle`` (default: ``train``) shuffles shards and
    samples, else they come in file order. ``patch_size`` checks that ``image_size`` is a
    multiple of the ViT's patch. ``batches_per_epoch`` (per rank) defaults to total samples //
    (world_size * batch_size). ``drop_last=False`` instead reads every sample once with a final
    partial batch (single-process evaluation only, since counts would differ by rank; inside a
    distributed job pass ``rank=0, world_size=1`` to evaluate the whole set on one rank).
    ``rank``/``world_size`` default to the torch.distributed context. ``device``: where batches
    are delivered and normalised (default: the CPU; with GPU decoding CUDA when available).
    """
    rank, world_size = resolve_rank(rank, world_size)
    batch_size, decode = settings.batch_size, settings.decode  # validated where LoaderSettings is made
    if decode == "gpu" and dense:
        raise UserError("decode='gpu' is for (image, label) batches; dense batches decode on the CPU")
    check_size(image_size, patch_size)
    key = LabelKey.parse(settings.label_key)
    if device is None:
        device = "cuda" if decode == "gpu" and torch.cuda.is_available() else "cpu"
    needs_total = drop_last and batches_per_epoch is None
    shards = Shards.resolve(url, split=split, samples=samples, num_classes=settings.num_classes,
                            count=needs_total)
    if not drop_last:
        if world_size > 1 or resampled:
            raise UserError("drop_last=False is for single-process, non-resampled evaluation")
        batches_per_epoch = None
    elif batches_per_epoch is None:
        if shards.total is None:
            raise UserError(f"{url}: the number of samples is unknown; pass batches_per_epoch")
        batches_per_epoch = shards.total // (world_size * batch_size)
        if batches_per_epoch == 0:
            raise UserError(
                f"{url}: {shards.total} samples are fewer than one batch of {batch_size} "
                f"per rank for {world_size} rank(s)"
            )
    elif batches_per_epoch < 1:
        raise UserError(f"batches_per_epoch must be positive, got {batches_per_epoch}")
    stream = ShardStream(
        shards=shards, rank=rank, world_size=world_size, batch_size=batch_size,
        batches_per_epoch=batches_per_epoch, image_size=image_size, train=train,
        shuffle=train if shuffle is None else shuffle, seed=settings.seed,
        epoch=epoch, resampled=resampled, dense=dense, error_budget=settings.error_budget,
        shuffle_buffer=shuffle_buffer, retries=retries, backoff_s=backoff_s,
        crop_scale=tuple(settings.crop_scale), label_key=key, decode=decode,
    )
    return ShardLoader(stream, settings.num_workers, pin_memory, torch.device(device), normalize)
