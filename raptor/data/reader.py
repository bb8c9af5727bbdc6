"""Reading samples out of shards, where bad data is met: skipped, counted and logged, never silent.

Two kinds of damage are survivable: a sample that does not decode (corrupt image, missing or
non-integer label, a duplicated member) and a shard that ends early or is damaged (truncated or
corrupt tar, or fewer samples than its info file lists; the samples it should still have held
count as skipped). Neither is an I/O error: a shard that cannot be opened, or whose stream breaks
off mid-read (a connection reset, an object store outage), is opened again with backoff and read on
from the last whole sample it delivered, so nothing is skipped or repeated
(``stats.read_retries`` counts these); when it stays unreachable through the retries, the run fails
naming it (:class:`~raptor.data.gopen.ShardUnavailableError`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import IO, Any, Callable, Iterator, TypeVar

from raptor.data import tarstream
from raptor.data.decode import LabelKey
from raptor.data.gopen import TRANSIENT, ShardUnavailableError, keep_trying, open_shard, wait_before_retry

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DataStats:
    """Counters the training loop logs; one per reader, summed by :class:`ShardLoader`."""

    seen: int = 0  # samples taken from shards, good or bad
    skipped: int = 0  # bad samples dropped: undecodable, unlabelled, or lost in a damaged shard
    shard_errors: int = 0  # shards that ended early (truncated or corrupt tar)
    repeated: int = 0  # samples used again: a reader's shards ran short, or to fill a bad one's slot
    read_retries: int = 0  # shard streams re-opened after a transient read error

    def add(self, other: "DataStats | dict[str, int]") -> None:
        values = other if isinstance(other, dict) else asdict(other)
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ErrorBudgetExceeded(RuntimeError):
    """More samples were bad than the error budget allows: the data is broken, stop the run."""


def count_bad(stats: DataStats, count: int, budget: float, expected: int, where: str, message: str) -> None:
    """Count ``count`` skipped samples and log why; stop once they exceed ``budget`` of the samples
    seen (or of ``expected``, the samples due this epoch, while fewer have been seen)."""
    stats.skipped += count
    log.warning("%s: %s", where, message)
    if stats.skipped > budget * max(stats.seen, expected):
        raise ErrorBudgetExceeded(
            f"{where}: {stats.skipped} of {stats.seen} samples were bad, "
            f"over the error budget of {budget:.1%} (last: {message})"
        )


@dataclass
class Reader:
    """One reader's view: who it is (for logs), its counters and its error budget."""

    where: str  # "rank R worker W", for log lines
    budget: float  # allowed fraction of bad samples
    expected: int  # samples this reader should take this epoch (the budget's floor)
    num_classes: int | None
    label_key: LabelKey
    retries: int
    backoff_s: float
    stats: DataStats
    good: int = 0  # items made so far (a pass that makes none cannot fill a quota)

    def bad(self, count: int, message: str) -> None:
        count_bad(self.stats, count, self.budget, self.expected, self.where, message)

    def samples(self, url: str, expected: int | None) -> Iterator[dict[str, Any]]:
        """The raw samples (``__key__``, ``__url__``, entries as bytes) of one shard."""
        count = resume = failures = 0
        since = 0.0  # when the current streak of read failures began
        while True:
            stream = open_shard(url, retries=self.retries, backoff_s=self.backoff_s)
            try:
                _skip_to(stream, resume)
                for sample, resume_after in tarstream.samples(stream, url, resume):
                    count, resume, failures = count + 1, resume_after, 0
                    self.stats.seen += 1
                    yield sample
                break
            except tarstream.CorruptShard as e:
                lost = max((expected or 0) - count, 1)
                self._lost(lost, f"shard {url} is truncated or corrupt after {count} samples "
                                 f"({e}); skipping its remaining {lost}")
                return
            except TRANSIENT as e:
                since = since if failures else time.monotonic()
                if not keep_trying(e, failures, self.retries, since):
                    raise ShardUnavailableError(
                        f"shard {url} failed mid-read {failures + 1} times after {count} samples: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                self.stats.read_retries += 1
                wait_before_retry(f"reading shard {url} after {count} samples", e, failures, self.backoff_s)
                failures += 1
            finally:
                stream.close()
        if expected is not None and count < expected:
            self._lost(expected - count, f"shard {url} holds {count} samples, {expected} expected; "
                                         f"counting the missing {expected - count} as skipped")

    def _lost(self, lost: int, message: str) -> None:
        self.stats.seen += lost
        self.stats.shard_errors += 1
        self.bad(lost, message)

    def item(self, sample: dict[str, Any], make: Callable[[dict[str, Any], int], T]) -> T | None:
        """``make(sample, label)``, or None (counted) when the sample is bad."""
        try:
            item = make(sample, self.label_key.read(sample, self.num_classes))
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            self.bad(1, f"skipping sample {sample.get('__key__')} of {sample.get('__url__')}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self.good += 1
        return item


def _skip_to(stream: IO[bytes], offset: int) -> None:
    """Position a freshly opened stream at ``offset`` (seeking when it can, else reading)."""
    if not offset:
        return
    if stream.seekable():
        stream.seek(offset)
        return
    left = offset
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise tarstream.CorruptShard(f"ends before byte {offset}, where it broke off before")
        left -= len(chunk)
