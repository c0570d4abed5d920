"""One subscriber's batching as data: when a batch is due (maxItems, maxBytes or timeoutMs), what is resent after a
failed delivery, and which records are dropped (and counted) when the subscriber falls behind. Pure: no clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from lambdabox.core.telemetry import Buffering

# Queue bound per subscriber, in units of its maxItems and maxBytes: one batch in flight plus one filling up is at most
# 2 x maxBytes (Lambda's documented worst-case payload); twice that absorbs a burst while a slow POST is outstanding.
# Beyond it new records are dropped and counted, so memory stays under 4 MiB of records at the largest maxBytes.
QUEUE_FACTOR = 4


@dataclass(frozen=True)
class Backoff:
    """Delay before resending a failed batch: ``first_s`` doubling per consecutive failure, at most ``cap_s``."""

    first_s: float = 0.05
    cap_s: float = 2.0

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.first_s * 2.0 ** max(0, failures - 1))


T = TypeVar("T")


# One buffered record, made once per record per subscriber on the hot path: a plain tuple (a NamedTuple's
# constructor costs several times a tuple display). ``report`` > 0: a platform.logsDropped record (of that many
# drops) that the batcher added, not a produced record.
_Entry = tuple[int, T, int, float, int]  # seq, item, size, added_at, report
SEQ: Final = 0
ITEM: Final = 1
SIZE: Final = 2
ADDED_AT: Final = 3
REPORT: Final = 4


class Batcher(Generic[T]):
    """One subscriber's buffer. ``add`` records; when ``due``, ``take`` a batch, send it, then ``ack`` it or report
    it ``failed`` (the same batch comes back from the next ``take``, after a backoff). Records beyond the queue bound
    are dropped and counted; ``report_drops`` turns the counts into one record. Once nothing is buffered, delivered +
    dropped = produced; at any time, delivered + dropped + ``undelivered`` = produced."""

    def __init__(
        self,
        buffering: Buffering,
        *,
        limit_items: int | None = None,
        limit_bytes: int | None = None,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.buffering = buffering
        self.limit_items = limit_items or QUEUE_FACTOR * buffering.max_items
        self.limit_bytes = limit_bytes or QUEUE_FACTOR * buffering.max_bytes
        self.backoff = backoff
        self._timeout_s = buffering.timeout_ms / 1000
        self._queue: deque[_Entry[T]] = deque()
        self._queued_bytes = 0
        self._inflight: list[_Entry[T]] = []
        self._inflight_bytes = 0
        self._retry_at = 0.0
        self.failures = 0  # consecutive failed sends of the batch in flight
        self._seq = 0
        self._pending = [0, 0]  # dropped records and bytes not yet reported
        self._reports_outstanding = 0
        self.produced = self.delivered = self.dropped_records = self.dropped_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._queue) + len(self._inflight)

    @property
    def buffered_bytes(self) -> int:
        return self._queued_bytes + self._inflight_bytes

    @property
    def undelivered(self) -> int:
        """Produced records neither delivered nor dropped: still buffered (all of them lost if the subscriber ends)."""
        return self.produced - self.delivered - self.dropped_records

    @property
    def unreported(self) -> int:
        """Dropped records whose platform.logsDropped has not been delivered (counted, or queued to be sent)."""
        return self._pending[0] + sum(entry[REPORT] for entry in (*self._inflight, *self._queue))

    @property
    def last_seq(self) -> int:
        return self._seq

    def add(self, item: T, size: int, now: float) -> bool:
        """Buffer one produced record; False if the queue is full and it was dropped (and counted)."""
        self.produced += 1
        seq = self._seq = self._seq + 1
        queue = self._queue
        if (
            len(queue) + len(self._inflight) >= self.limit_items
            or self._queued_bytes + self._inflight_bytes + size > self.limit_bytes
        ):
            self.count_dropped(1, size, produced=False)
            return False
        queue.append((seq, item, size, now, 0))
        self._queued_bytes += size
        return True

    def count_dropped(self, records: int, nbytes: int, *, produced: bool = True) -> None:
        """Count records lost before they reached this buffer (``produced``: they count as produced here too)."""
        if produced:
            self.produced += records
        self.dropped_records += records
        self.dropped_bytes += nbytes
        self._pending[0] += records
        self._pending[1] += nbytes

    def dropped(self) -> tuple[int, int]:
        """Records and bytes dropped and not yet reported in a ``platform.logsDropped`` record."""
        return self._pending[0], self._pending[1]

    def report_drops(self, make: Callable[[int, int], tuple[T, int]], now: float) -> bool:
        """If drops are unreported and the queue has room, queue one report ``make(records, bytes)`` -> (item, size)."""
        records, nbytes = self._pending
        if not records or self.buffered >= self.limit_items or self.buffered_bytes >= self.limit_bytes:
            return False
        item, size = make(records, nbytes)
        self._seq += 1
        self._queue.append((self._seq, item, size, now, records))
        self._queued_bytes += size
        self._pending = [0, 0]
        self._reports_outstanding += 1
        return True

    def due(self, now: float, *, flushing: bool = False) -> bool:
        """A batch should go now: a failed one whose backoff is over, or maxItems, maxBytes or timeoutMs reached
        (``flushing``: anything buffered)."""
        if self._inflight:
            return now >= self._retry_at
        queue = self._queue
        if not queue:
            return False
        return (
            flushing
            or len(queue) >= self.buffering.max_items
            or self._queued_bytes >= self.buffering.max_bytes
            or now >= queue[0][ADDED_AT] + self._timeout_s
        )

    def next_deadline(self) -> float | None:
        """When ``due`` turns true with no new record: the retry time, or the oldest record's timeoutMs."""
        if self._inflight:
            return self._retry_at
        if self._queue:
            return self._queue[0][ADDED_AT] + self._timeout_s
        return None

    def take(self) -> list[T]:
        """The batch to send: the unacknowledged one again, or the oldest records up to maxItems and maxBytes."""
        if not self._inflight:
            batch, nbytes, limit = self._inflight, 0, self.buffering
            while self._queue and len(batch) < limit.max_items:
                size = self._queue[0][SIZE]
                if batch and nbytes + size > limit.max_bytes:
                    break
                batch.append(self._queue.popleft())
                nbytes += size
            self._queued_bytes -= nbytes
            self._inflight_bytes = nbytes
        return [entry[ITEM] for entry in self._inflight]

    def ack(self) -> int:
        """The batch in flight was delivered; returns how many produced records it held."""
        reports = sum(1 for entry in self._inflight if entry[REPORT])
        records = len(self._inflight) - reports
        self._reports_outstanding -= reports
        self.delivered += records
        self._inflight = []
        self._inflight_bytes = 0
        self.failures = 0
        return records

    def failed(self, now: float) -> int:
        """The batch in flight was not acknowledged: keep it for a resend after the backoff; returns the streak."""
        self.failures += 1
        self._retry_at = now + self.backoff.delay(self.failures)
        return self.failures

    def settled(self, through: int) -> bool:
        """Every record up to sequence number ``through`` was delivered or dropped, and every drop was reported."""
        oldest = self._inflight[0] if self._inflight else (self._queue[0] if self._queue else None)
        waiting = oldest is not None and oldest[SEQ] <= through
        return not waiting and not self._pending[0] and not self._reports_outstanding
