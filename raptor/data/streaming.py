"""The streaming reader every training worker uses: shards -> decoded, augmented batches.

A training epoch has one global order, whatever the number of ranks and loader workers
(readers) that read it, so a run resized mid-epoch reads on where it stopped:

- The shard list is shuffled by (seed, epoch) and dealt round-robin to ``streams`` read streams
  (fixed for the run: :func:`default_streams`). Each stream reads its shards in turn through its
  own shuffle buffer, seeded by (seed, epoch, stream); a stream whose shards run short reads them
  again (counted as ``repeated``). Resampled mode draws each stream's shards with replacement
  instead (no notion of a pass, as open_clip's ``--dataset-resampled``).
- Step ``s`` of the epoch is ``global_batch`` samples: the next ``global_batch / streams`` of every
  stream, stream after stream. An epoch is ``total // global_batch`` steps, so every sample is read
  exactly once per epoch when the streams hold equal samples (equal shards, a shard count that the
  streams divide) and the global batch divides the total.
- Rank ``r`` of ``W`` takes positions ``[r G // W, (r+1) G // W)`` of every step (shares differ by
  one sample where ``W`` does not divide ``G``), as equally many micro-batches on every rank; its
  loader workers take consecutive parts of that share; a reader reads every stream its positions
  fall in and decodes only its own samples (two readers can share a stream: both read its bytes,
  each decodes its part).
- Each sample's crop is drawn from a generator seeded by (seed, epoch, stream, position in the
  stream), so augmentation does not depend on who decodes it either.

Resuming at step ``s`` of an epoch reads the streams' first ``s`` steps without decoding them.
A bad sample (undecodable, unlabelled) keeps its position: its slot is filled with the next sample
of the same stream's part of that step that decodes (counted as ``skipped`` and ``repeated``), the
same at any world size, so batches stay whole and positions never shift. Evaluation (``drop_last=False``) is one exact pass in file order on one
process, with a final partial batch.

Decoding (:mod:`raptor.data.decode`): ``decode="cpu"`` decodes and crops in the readers, which send
uint8 batches; ``decode="gpu"`` has them send the encoded JPEGs with their drawn crops, decoded in
the training process on ``device``. Either way the loader delivers images normalised on ``device``
(float32), or as uint8 with ``normalize=False``.

Error counts: each reader counts into its own :class:`DataStats` inside its worker process (a
stream's shard-level counts by the reader holding the stream's first position), and sends the
increments along with every batch; :class:`ShardLoader` strips them off in the training process
and adds them to ``loader.stats``. So the counts need no shared memory, and they are exact for
every batch the training loop has received.
"""

from __future__ import annotations

import hashlib
import itertools
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


def default_streams(global_batch: int, order_world_size: int, num_workers: int, shards: int | None) -> int:
    """Read streams of a run that does not set them: one per reader of the world size the order is
    laid out for (``order_world_size`` ranks x ``num_workers`` loader workers), rounded down to a
    divisor of the global batch and to at most one per shard."""
    want = order_world_size * max(num_workers, 1)
    cap = min(want, global_batch, shards or want)
    return max(d for d in range(1, cap + 1) if global_batch % d == 0)


@dataclass
class ShardStream(IterableDataset):
    """The per-reader pipeline run inside each DataLoader worker (see the module docstring)."""

    shards: Shards
    rank: int
    world_size: int
    batch_size: int  # the micro-batch: what the loader delivers
    global_batch: int  # samples per step over all ranks
    streams: int
    steps_per_epoch: int | None  # None: one exact pass with a final partial batch
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
    start_step: int = 0  # the step of the epoch to deliver first

    def rank_positions(self) -> tuple[int, int]:
        """The ``[start, stop)`` positions of every step's global batch this rank delivers (the ranks' shares
        differ by one sample at most where the world size does not divide the global batch)."""
        return self.rank * self.global_batch // self.world_size, (self.rank + 1) * self.global_batch // self.world_size

    def positions(self, worker: int, num_workers: int) -> tuple[int, int]:
        """The ``[start, stop)`` positions of every step's global batch that one reader delivers."""
        first, last = self.rank_positions()
        return first + worker * (last - first) // num_workers, first + (worker + 1) * (last - first) // num_workers

    def micro_batches(self) -> list[int]:
        """The sizes of this rank's micro-batches of one step: as many on every rank (the fewest that keep
        the largest share within the batch size), each rank's share split as evenly as it goes."""
        first, last = self.rank_positions()
        largest = -(-self.global_batch // self.world_size)
        count = -(-largest // self.batch_size)
        return [(last - first) * (i + 1) // count - (last - first) * i // count for i in range(count)]

    def exact_shards(self, worker: int, num_workers: int) -> list[int]:
        """The shards one reader of an exact pass reads (round-robin, in file order)."""
        return list(range(len(self.shards.urls)))[worker::num_workers]

    def __iter__(self) -> Iterator[tuple[Any | None, dict[str, int]]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self.steps_per_epoch is None:
            yield from self._exact_pass(worker, num_workers)
        else:
            yield from self._epoch(worker, num_workers)

    def _reader(self, where: str, expected: int) -> Reader:
        return Reader(where=where, budget=self.error_budget, expected=expected, num_classes=self.shards.num_classes,
                      label_key=self.label_key, retries=self.retries, backoff_s=self.backoff_s, stats=DataStats())

    def _make(self, *seed: object) -> Any:
        """What turns one raw sample into an item, its crop drawn from a generator seeded by ``seed``."""
        augment = Augment(self.image_size, self.train, self.crop_scale, random.Random(_seed(self.seed, self.epoch, *seed)))
        if self.decode == "gpu":
            return partial(gpu_item, augment=augment)
        return partial(cpu_item, augment=augment, dense=self.dense)

    def _collate(self, items: list[Any]) -> Any:
        if self.decode == "gpu":
            return EncodedBatch.collate(items, size=self.image_size)
        return _stack(items)

    def _exact_pass(self, worker: int, num_workers: int) -> Iterator[tuple[Any | None, dict[str, int]]]:
        """Every sample of this reader's shards once, in file order, in batches (the last one partial)."""
        shard_ids = self.exact_shards(worker, num_workers)
        if not shard_ids:
            return
        where = f"rank {self.rank} worker {worker}"
        reader = self._reader(where, sum(self.shards.counts[s] or 0 for s in shard_ids))
        raw = self._raw(reader, shard_ids, random.Random(_seed(self.seed, self.epoch, worker)), repeat=False)
        sent = DataStats()
        while True:
            items: list[Any] = []
            for sample in raw:
                item = reader.item(sample, self._make(sample.get("__key__"), sample.get("__url__")))
                if item is not None:
                    items.append(item)
                    if len(items) == self.batch_size:
                        break
            delta = {k: v - getattr(sent, k) for k, v in reader.stats.as_dict().items()}
            sent = replace(reader.stats)
            if not items:  # the pass is over: send the last counts on their own
                if any(delta.values()):
                    yield None, delta
                return
            yield self._collate(items), delta

    def _epoch(self, worker: int, num_workers: int) -> Iterator[tuple[Any | None, dict[str, int]]]:
        """One piece per step from ``start_step`` on: this reader's positions of the step, in order."""
        assert self.steps_per_epoch is not None
        start, stop = self.positions(worker, num_workers)
        per_stream = self.global_batch // self.streams
        where = f"rank {self.rank} worker {worker}"
        mine = self._reader(where, (stop - start) * self.steps_per_epoch)
        touched = range(start // per_stream, -(-stop // per_stream)) if stop > start else range(0)
        streams = {v: self._stream(v, where, per_stream) for v in touched}
        owned = [reader for v, (reader, _) in streams.items() if start <= v * per_stream < stop]
        for _, samples in streams.values():  # resuming: the steps already taken, read but not decoded
            for _ in range(self.start_step * per_stream):
                next(samples)
        sent = _counts(mine, owned)  # what the skipped steps counted was counted by the run that read them
        for step in range(self.start_step, self.steps_per_epoch):
            items: list[Any] = []
            for v, (_, samples) in streams.items():
                chunk = [next(samples) for _ in range(per_stream)]
                first = v * per_stream
                for i in range(max(start - first, 0), min(stop - first, per_stream)):
                    mine.stats.seen += 1
                    item = mine.item(chunk[i], self._make(v, step * per_stream + i))
                    items.append(item if item is not None else self._stand_in(chunk, v, step, i, mine))
            counts = _counts(mine, owned)
            delta = {k: n - sent.get(k, 0) for k, n in counts.items()}
            sent = counts
            yield (self._collate(items) if items else None), delta

    def _stand_in(self, chunk: list[dict[str, Any]], v: int, step: int, i: int, reader: Reader) -> Any:
        """What takes bad sample ``i``'s slot: the next sample of the same stream's part of the step that
        decodes (as it decodes at its own position), counted as repeated; the same at any world size."""
        per_stream = len(chunk)
        for j in (i + n for n in range(1, per_stream)):
            j %= per_stream
            try:
                item = self._make(v, step * per_stream + j)(chunk[j], reader.label_key.read(chunk[j], reader.num_classes))
            except Exception:  # noqa: BLE001 - another bad sample: its own reader counts it
                continue
            reader.stats.repeated += 1
            return item
        raise ErrorBudgetExceeded(f"{reader.where}: no sample of stream {v}'s {per_stream} in step {step} decodes")

    def _stream(self, v: int, where: str, per_stream: int) -> tuple[Reader, Iterator[dict[str, Any]]]:
        """Stream ``v`` of this epoch: its reader (shard-level counts) and its endless raw samples."""
        n = len(self.shards.urls)
        if self.resampled:
            shard_ids = list(range(n))
        else:
            order = list(range(n))
            if self.shuffle:
                random.Random(_seed(self.seed, self.epoch)).shuffle(order)
            shard_ids = order[v :: self.streams]
        assert self.steps_per_epoch is not None
        reader = self._reader(f"{where} stream {v}", per_stream * self.steps_per_epoch)
        rng = random.Random(_seed(self.seed, self.epoch, "stream", v))
        return reader, self._raw(reader, shard_ids, rng, repeat=True)

    def _raw(
        self, reader: Reader, shard_ids: list[int], rng: random.Random, repeat: bool
    ) -> Iterator[dict[str, Any]]:
        """Samples of these shards, pass after pass while ``repeat``.

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
            read = 0
            for sample in samples:
                read += 1
                yield sample
            if not repeat:
                return
            if not read:  # another pass would not read one either: never loop forever
                raise ErrorBudgetExceeded(
                    f"{reader.where}: shards {[self.shards.urls[s] for s in order]} hold no samples"
                )
            passes += 1

    def _pass(self, reader: Reader, order: list[int], repeated: bool) -> Iterator[dict[str, Any]]:
        for s in order:
            for sample in reader.samples(self.shards.urls[s], self.shards.counts[s]):
                if repeated:
                    reader.stats.repeated += 1
                yield sample


def _counts(mine: Reader, owned: list[Reader]) -> dict[str, int]:
    """A reader's counts so far: its own samples', plus the shard-level counts of the streams it owns
    (a stream's samples lost to a damaged shard count as seen and skipped)."""
    counts = mine.stats.as_dict()
    for stream in owned:
        s = stream.stats
        counts["seen"] += s.skipped
        counts["skipped"] += s.skipped
        counts["shard_errors"] += s.shard_errors
        counts["read_retries"] += s.read_retries
        counts["repeated"] += s.repeated
    return counts


def _stack(items: list[tuple[torch.Tensor, ...]]) -> Batch:
    """Stack samples column by column (images stay uint8: a quarter of float's bytes to send)."""
    return tuple(torch.stack([item[i] for item in items]) for i in range(len(items[0])))


class ShardLoader:
    """Iterable of batches for one rank: ``(images [B,3,H,W], labels [B] long)``, plus
    ``masks [B,H,W] long`` and ``depth [B,H,W] float`` when dense, all on ``device``. Images are
    float32 normalised by ImageNet mean/std, or uint8 0..255 with ``normalize=False``.

    ``len(loader)`` is the number of batches per epoch (the same for every rank unless
    ``drop_last=False``; ``loader.steps_per_epoch`` global batches of ``len(loader) /
    steps_per_epoch`` micro-batches each); ``loader.set_epoch(e, start_step)`` before iterating
    picks the epoch and where in it to start; ``loader.stats`` holds the summed error counters of
    every batch received so far.
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

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch: the same for every rank at any world size."""
        if self.stream.steps_per_epoch is None:
            raise TypeError("drop_last=False: the number of batches is not fixed")
        return self.stream.steps_per_epoch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its step ``start_step`` on (the steps before are read, not decoded)."""
        if start_step and not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.stream.epoch, self.stream.start_step = epoch, start_step

    @property
    def num_classes(self) -> int | None:
        return self.stream.shards.num_classes

    def __len__(self) -> int:
        """Micro-batches this rank delivers per epoch (from ``start_step`` on)."""
        return (self.steps_per_epoch - self.stream.start_step) * len(self.stream.micro_batches())

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
        exact = self.stream.steps_per_epoch is None
        sizes = itertools.repeat(self.stream.batch_size) if exact else itertools.cycle(self.stream.micro_batches())
        size = next(sizes)
        parts: list[Batch] = []
        for raw, delta in data:
            self.stats.add(delta)
            if raw is None:
                continue
            batch = self._finish(raw)
            if len(batch[0]) == size and not parts:
                yield batch
                size = next(sizes)
                continue
            parts.append(batch)
            while parts and sum(len(p[0]) for p in parts) >= size:
                merged = tuple(torch.cat(column) for column in zip(*parts))
                yield tuple(t[:size] for t in merged)
                rest = tuple(t[size:] for t in merged)
                parts = [rest] if len(rest[0]) else []
                size = next(sizes)
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
        s = self.stream
        exact = s.steps_per_epoch is None
        expected = (s.shards.total or 0) if exact else s.steps_per_epoch * sum(s.micro_batches())
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
    global_batch: int | None = None,
    order_world_size: int | None = None,
    steps_per_epoch: int | None = None,
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
    crop scale, class count, label key, read streams, where JPEGs are decoded; see
    :class:`~raptor.data.settings.LoaderSettings`); the keywords say what this call reads.
    ``url`` is a dataset folder (raptor's or timm's, with ``_info.json``, or any folder of
    ``.tar`` shards), a brace pattern of shards, or one shard; ``split`` picks a split of a timm
    dataset or a set of tars in a folder (see :mod:`raptor.data.formats`). ``samples`` states
    the total where no info file gives it (else it is counted once and cached).
    ``train`` selects the DINOv2 train transform (RandomResizedCrop over the settings' crop
    scale), else the eval transform; ``shuffle`` (default: ``train``) shuffles shards and
    samples, else they come in file order. ``patch_size`` checks that ``image_size`` is a
    multiple of the ViT's patch.

    A training epoch (``drop_last=True``) is ``steps_per_epoch`` global batches of
    ``global_batch`` samples (default: batch size x world size; default steps: total //
    global_batch), in one order for any world size (the module docstring); this rank delivers
    its ``global_batch / world_size`` samples of each as micro-batches of the settings' batch size.
    The settings' ``streams`` (default: :func:`default_streams` for ``order_world_size``, default
    ``world_size``) fix the order: a trainer that keeps its global batch at any world
    size passes the same ``order_world_size`` at every one.
    ``drop_last=False`` instead reads every sample once with a final partial batch (single-process
    evaluation only; inside a distributed job pass ``rank=0, world_size=1`` to evaluate the whole
    set on one rank). ``rank``/``world_size`` default to the torch.distributed context.
    ``device``: where batches are delivered and normalised (default: the CPU; with GPU decoding
    CUDA when available).
    """
    rank, world_size = resolve_rank(rank, world_size)
    batch_size, decode = settings.batch_size, settings.decode  # validated where LoaderSettings is made
    if decode == "gpu" and dense:
        raise UserError("decode='gpu' is for (image, label) batches; dense batches decode on the CPU")
    check_size(image_size, patch_size)
    key = LabelKey.parse(settings.label_key)
    if device is None:
        device = "cuda" if decode == "gpu" and torch.cuda.is_available() else "cpu"
    global_batch = global_batch or batch_size * world_size
    if global_batch < world_size:
        raise UserError(f"a global batch of {global_batch} leaves some of {world_size} ranks without a sample")
    shards = Shards.resolve(url, split=split, samples=samples, num_classes=settings.num_classes,
                            count=drop_last and steps_per_epoch is None)
    if not drop_last:
        if world_size > 1 or resampled:
            raise UserError("drop_last=False is for single-process, non-resampled evaluation")
        steps_per_epoch, streams = None, 1
    else:
        steps_per_epoch = _steps(url, shards.total, global_batch, steps_per_epoch)
        streams = _streams(len(shards.urls), global_batch, settings, resampled, order_world_size or world_size)
    stream = ShardStream(
        shards=shards, rank=rank, world_size=world_size, batch_size=batch_size, global_batch=global_batch,
        streams=streams, steps_per_epoch=steps_per_epoch, image_size=image_size, train=train,
        shuffle=train if shuffle is None else shuffle, seed=settings.seed,
        epoch=epoch, resampled=resampled, dense=dense, error_budget=settings.error_budget,
        shuffle_buffer=shuffle_buffer, retries=retries, backoff_s=backoff_s,
        crop_scale=tuple(settings.crop_scale), label_key=key, decode=decode,
    )
    return ShardLoader(stream, settings.num_workers, pin_memory, torch.device(device), normalize)


def _steps(url: str, total: int | None, global_batch: int, steps_per_epoch: int | None) -> int:
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        return steps_per_epoch
    if total is None:
        raise UserError(f"{url}: the number of samples is unknown; pass steps_per_epoch")
    if total < global_batch:
        raise UserError(f"{url}: {total} samples are fewer than one global batch of {global_batch}")
    return total // global_batch


def _streams(shards: int, global_batch: int, settings: LoaderSettings, resampled: bool, order_world_size: int) -> int:
    """The read streams: as set (they must divide the global batch, one shard each at least), else the default."""
    streams = settings.streams
    if streams is None:
        return default_streams(global_batch, order_world_size, settings.num_workers, None if resampled else shards)
    if global_batch % streams:
        raise UserError(f"data.streams={streams} does not divide the global batch of {global_batch}: "
                        "each step takes as many samples from every stream")
    if not resampled and streams > shards:
        raise UserError(f"data.streams={streams} needs at least as many shards; there are {shards}: "
                        "write more, smaller shards (max_samples), use fewer streams or resampled=True")
    return streams
