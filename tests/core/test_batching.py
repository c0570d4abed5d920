"""Batching as data: due at each bound (maxItems, maxBytes, timeoutMs), drops beyond the queue bound counted exactly
so that delivered + dropped = produced, and a failed batch resent whole after a capped backoff. No clock."""

from __future__ import annotations

import pytest

from lambdabox.core.batching import Backoff, Batcher
from lambdabox.core.telemetry import Buffering

SMALL = Buffering(max_items=1_000, max_bytes=262_144, timeout_ms=100)


def fill(batcher: Batcher[int], count: int, size: int = 10, now: float = 0.0, start: int = 0) -> list[bool]:
    return [batcher.add(start + i, size, now) for i in range(count)]


def test_nothing_is_due_while_empty() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    assert not batcher.due(0.0)
    assert not batcher.due(0.0, flushing=True)
    assert batcher.next_deadline() is None
    assert batcher.take() == []


def test_a_batch_is_due_at_timeout_ms_after_the_oldest_record() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    fill(batcher, 1, now=10.0)
    fill(batcher, 1, now=10.05, start=1)
    assert batcher.next_deadline() == pytest.approx(10.1)
    assert not batcher.due(10.099)
    assert batcher.due(10.1)
    assert batcher.due(10.0, flushing=True)
    assert batcher.take() == [0, 1]


def test_a_batch_is_due_at_max_items() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    fill(batcher, 999)
    assert not batcher.due(0.0)
    fill(batcher, 1, start=999)
    assert batcher.due(0.0)
    fill(batcher, 5, start=1000)
    assert batcher.take() == list(range(1000))
    assert batcher.buffered == 1005 and batcher.buffered_bytes == 10_050  # in flight until acknowledged
    batcher.ack()
    assert batcher.buffered == 5 and not batcher.due(0.0)


def test_a_batch_is_due_at_max_bytes_and_holds_at_most_max_bytes() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    fill(batcher, 2, size=100_000)
    fill(batcher, 1, size=62_143, start=2)
    assert not batcher.due(0.0)  # 262 143 bytes
    fill(batcher, 1, size=1, start=3)
    assert batcher.due(0.0)  # 262 144 bytes
    fill(batcher, 1, size=1, start=4)
    assert batcher.take() == [0, 1, 2, 3]  # a fifth would pass 262 144 bytes
    batcher.ack()
    assert batcher.take() == [4]


def test_a_record_larger_than_max_bytes_goes_alone() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    fill(batcher, 2, size=300_000)
    assert batcher.take() == [0]
    batcher.ack()
    assert batcher.take() == [1]


def test_records_beyond_the_queue_bound_are_dropped_and_counted_exactly() -> None:
    batcher: Batcher[int] = Batcher(SMALL, limit_items=5, limit_bytes=1_000)
    assert (batcher.limit_items, batcher.limit_bytes) == (5, 1_000)
    assert fill(batcher, 7) == [True] * 5 + [False] * 2
    assert batcher.dropped() == (2, 20)
    assert batcher.buffered == 5
    by_bytes: Batcher[int] = Batcher(SMALL, limit_bytes=1_000)
    assert fill(by_bytes, 3, size=400) == [True, True, False]
    assert by_bytes.dropped() == (1, 400)


def test_the_default_queue_bound_is_four_batches() -> None:
    batcher: Batcher[int] = Batcher(Buffering(max_items=1_000, max_bytes=1_048_576, timeout_ms=25))
    assert (batcher.limit_items, batcher.limit_bytes) == (4_000, 4 * 1_048_576)


def report(records: int, nbytes: int) -> tuple[int, int]:
    return -records, 50


def test_drops_are_reported_once_there_is_room() -> None:
    batcher: Batcher[int] = Batcher(SMALL, limit_items=3)
    fill(batcher, 5)
    assert not batcher.report_drops(report, 0.0)  # full: the report waits
    batcher.take()
    assert not batcher.report_drops(report, 0.0)  # in flight still counts
    batcher.ack()
    fill(batcher, 1, start=100)
    assert batcher.report_drops(report, 0.0)
    assert batcher.dropped() == (0, 0)
    assert not batcher.report_drops(report, 0.0)
    assert batcher.take() == [100, -2]
    batcher.ack()
    assert (batcher.produced, batcher.delivered, batcher.dropped_records, batcher.dropped_bytes) == (6, 4, 2, 20)


def test_delivered_plus_dropped_is_produced_through_a_slow_consumer() -> None:
    batcher: Batcher[int] = Batcher(SMALL, limit_items=2_500)
    delivered: list[int] = []
    reported = 0

    def consume(now: float) -> None:
        nonlocal reported
        batcher.report_drops(report, now)
        batch = batcher.take()
        delivered.extend(item for item in batch if item >= 0)
        reported += sum(-item for item in batch if item < 0)
        batcher.ack()

    for round_ in range(20):  # 3 000 records arrive per round, the consumer takes two batches of 1 000
        fill(batcher, 3_000, start=round_ * 3_000, now=float(round_))
        consume(float(round_))
        consume(float(round_))
    while batcher.buffered or batcher.dropped()[0]:
        consume(99.0)
    assert delivered == sorted(set(delivered))  # in order, none twice
    assert len(delivered) + reported == 60_000 == batcher.produced
    assert batcher.delivered == len(delivered) and batcher.dropped_records == reported > 0
    assert batcher.settled(batcher.last_seq)


def test_a_failed_batch_is_resent_whole_after_a_growing_capped_backoff() -> None:
    batcher: Batcher[int] = Batcher(SMALL, backoff=Backoff(first_s=0.05, cap_s=0.3))
    fill(batcher, 3)
    first = batcher.take()
    fill(batcher, 2, start=3)  # arrives while the first batch is in flight
    delays = []
    now = 1.0
    for expected in (1, 2, 3, 4, 5):
        assert batcher.failed(now) == expected
        deadline = batcher.next_deadline()
        assert deadline is not None
        delays.append(round(deadline - now, 6))
        assert not batcher.due(deadline - 0.001) and batcher.due(deadline)
        assert not batcher.due(deadline - 0.001, flushing=True)
        assert batcher.take() == first == [0, 1, 2]
        now = deadline
    assert delays == [0.05, 0.1, 0.2, 0.3, 0.3]
    assert batcher.ack() == 3
    assert batcher.failures == 0
    assert batcher.take() == [3, 4]


def test_counted_drops_before_the_buffer_are_produced_and_reported() -> None:
    batcher: Batcher[int] = Batcher(SMALL)
    batcher.count_dropped(4, 400)
    assert (batcher.produced, batcher.dropped()) == (4, (4, 400))
    assert not batcher.settled(0)
    assert batcher.report_drops(report, 0.0)
    assert batcher.take() == [-4]
    assert not batcher.settled(0)
    batcher.ack()
    assert batcher.settled(batcher.last_seq) and batcher.delivered == 0


def test_settled_means_everything_up_to_a_point_was_delivered_or_dropped() -> None:
    batcher: Batcher[int] = Batcher(SMALL, limit_items=2)
    fill(batcher, 2)
    target = batcher.last_seq
    fill(batcher, 1, start=2)  # dropped: newer than the target, but its report is still owed
    assert not batcher.settled(target)
    batcher.take()
    batcher.ack()
    assert not batcher.settled(target)
    batcher.report_drops(report, 0.0)
    batcher.take()
    batcher.ack()
    assert batcher.settled(target)
