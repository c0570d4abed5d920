"""Telemetry delivery: the hub that fans every environment event out to the Logs and Telemetry API subscribers, and
one dumb asyncio loop per subscriber (a task of the hub's group) that sends what its batcher says is due (HTTP POST of
a JSON array, or TCP NDJSON), resends after a failure with backoff, and reports drops. Decisions live in the core:
who subscribes and when (:mod:`lambdabox.core.subscriptions`), the records (:mod:`lambdabox.core.telemetry`) and the
batches (:mod:`lambdabox.core.batching`)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from lambdabox.core.batching import Backoff, Batcher
from lambdabox.core.telemetry import (
    CATEGORIES,
    TELEMETRY,
    EventLike,
    Subscription,
    category,
    dropped_record,
    encode,
    iso_time,
    line_bytes,
    render,
)
from lambdabox.environment.senders import HttpSender, SocketFactory, TcpSender
from lambdabox.loop import open_task_group

REQUEST_TIMEOUT_S = 5.0  # one POST, or one TCP connect + write, before it counts as a failed delivery
FAILING_AFTER = 6  # consecutive failed sends (about 3 s of backoff) before the environment is told
INIT_BUFFER_LIMIT = 10_000  # log lines of the current Init kept for extensions that subscribe later in it
IDLE_S = 60.0  # an idle loop still wakes up now and then: no wait without a deadline
DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class SubscriberStats:
    """One subscriber's accounting: ``delivered + dropped_records + undelivered == produced`` (``undelivered``: still
    buffered; once nothing is, none)."""

    api: str
    produced: int
    delivered: int
    dropped_records: int
    dropped_bytes: int
    buffered: int
    failures: int
    undelivered: int


class TelemetryHub:
    """Every event of one environment goes in through :meth:`observe`; each subscriber gets the records its API,
    schema version and types select. Between :meth:`open_init` and :meth:`close_init` the Init's records are kept for
    the extensions that subscribe during it; a new Init retires the previous Init's subscribers (their processes were
    restarted). Use :func:`open_telemetry_hub`, which owns the tasks."""

    def __init__(
        self,
        tasks: asyncio.TaskGroup,
        *,
        json_function_logs: bool = False,
        on_failing: Callable[[str], None] | None = None,
        on_undelivered: Callable[[str], None] | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        failing_after: int = FAILING_AFTER,
        backoff: Backoff = DEFAULT_BACKOFF,
        init_buffer_limit: int = INIT_BUFFER_LIMIT,
        epoch: Callable[[], float] = time.time,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.tasks = tasks
        self.json_function_logs = json_function_logs
        self.socket_factory = socket_factory  # read when a subscriber subscribes
        self.on_failing = on_failing
        self.on_undelivered = on_undelivered  # told, as a subscriber ends, of the records it never got
        self.request_timeout_s = request_timeout_s
        self.failing_after = failing_after
        self.backoff = backoff
        self.epoch = epoch
        self.clock = time.monotonic
        self._init_limit = init_buffer_limit
        self._subscribers: dict[str, _Subscriber] = {}
        self._keeping = False  # the current Init's records are kept for its later subscribers
        self._init_events: list[EventLike] = []
        self._init_overflow: dict[str, list[int]] = {}  # category -> [records, bytes] beyond the Init buffer
        self.thawed = asyncio.Event()  # cleared while the environment is frozen: no delivery starts
        self.thawed.set()

    # ---- what the environment calls ---------------------------------------------------------------------------

    def open_init(self) -> None:
        """A new Init: retire the previous Init's subscribers, and keep this Init's records for its subscribers."""
        self._keeping = True
        self._init_events, self._init_overflow = [], {}
        retired, self._subscribers = list(self._subscribers.values()), {}
        for subscriber in retired:
            self.tasks.create_task(subscriber.close())

    def close_init(self) -> None:
        """Init is over: nobody subscribes until the next; its records need not be kept."""
        self._keeping = False
        self._init_events, self._init_overflow = [], {}

    def observe(self, event: EventLike) -> None:
        """Take one event (synchronous and cheap: render, encode, buffer; the loops do the sending)."""
        kind = category(event.type)
        if kind not in CATEGORIES:
            return  # lambdabox's own events (lambdabox.*, the timeline's marks): no API carries them
        if self._keeping:
            self._remember(event, kind)
        if not self._subscribers:
            return
        now = self.clock()
        line = line_bytes(event, json_logs=self.json_function_logs)
        if line is not None:  # a log line (most records): the same bytes for every subscriber, made once
            for subscriber in self._subscribers.values():
                if kind in subscriber.types:
                    subscriber.offer_one(line, now)
            return
        cache: dict[tuple[str, str], list[bytes]] = {}
        for subscriber in self._subscribers.values():
            if kind in subscriber.types:
                blobs = cache.get(subscriber.key)
                if blobs is None:
                    blobs = cache[subscriber.key] = self._encode(subscriber.key, event)
                subscriber.offer(blobs, now)

    def subscribe(self, extension_name: str, subscription: Subscription) -> None:
        """Deliver to the extension's listener from now on, starting with the Init's records so far (the core has
        accepted the subscription: :class:`lambdabox.core.subscriptions.Subscriptions`)."""
        subscriber = self._subscribers[extension_name] = _Subscriber(extension_name, subscription, self)
        now = self.clock()
        for event in self._init_events:
            if category(event.type) in subscriber.types:
                subscriber.offer(self._encode(subscriber.key, event), now)
        for kind, (records, nbytes) in self._init_overflow.items():
            if kind in subscriber.types:
                subscriber.batcher.count_dropped(records, nbytes)

    async def flush(self) -> None:
        """Return once every record produced so far was delivered (or dropped and reported); while paused, only
        after :meth:`resume`. Bound it by the caller's deadline: ``async with asyncio.timeout(s): await hub.flush()``.
        """
        waits = [f for s in self._subscribers.values() if (f := s.wait_settled()) is not None]
        try:
            await asyncio.gather(*waits)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def pause(self) -> None:
        """Before the environment freezes: start no delivery until :meth:`resume`, and return once those under way
        are over (each is bounded by the request timeout), so no request is left waiting on a frozen listener.
        Records keep buffering; as in Lambda, they reach the subscriber after the next thaw."""
        self.hold()
        await asyncio.gather(*(s.wait_idle() for s in self._subscribers.values()))

    def hold(self) -> None:
        """Start no delivery until :meth:`resume` (what :meth:`pause` does before it waits)."""
        self.thawed.clear()

    @property
    def subscribed(self) -> bool:
        """Whether any extension subscribed (else :meth:`pause` has nothing to wait for)."""
        return bool(self._subscribers)

    def resume(self) -> None:
        """After the environment thaws: deliveries go on."""
        self.thawed.set()

    async def close(self) -> None:
        """Stop every loop and close every connection; what is still buffered is abandoned (see :meth:`stats`)."""
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        await asyncio.gather(*(s.close() for s in subscribers))

    def buffered(self) -> tuple[int, int]:
        """Records and bytes held in memory across all subscribers, plus the events kept for late subscribers."""
        records = sum(s.batcher.buffered for s in self._subscribers.values()) + len(self._init_events)
        return records, sum(s.batcher.buffered_bytes for s in self._subscribers.values())

    def stats(self) -> dict[str, SubscriberStats]:
        return {name: s.stats() for name, s in self._subscribers.items()}

    def failing(self) -> list[str]:
        """Extensions whose deliveries have failed ``failing_after`` times in a row and not succeeded since."""
        return [name for name, s in self._subscribers.items() if s.batcher.failures >= self.failing_after]

    # ---- inside -----------------------------------------------------------------------------------------------

    def _encode(self, key: tuple[str, str], event: EventLike) -> list[bytes]:
        return [encode(r) for r in render(key[0], key[1], event, json_logs=self.json_function_logs)]

    def _remember(self, event: EventLike, kind: str) -> None:
        """Keep the Init's events for later subscribers: every platform event (an Init has a few dozen at most),
        and log lines up to the limit; lines beyond it are counted, and reported as dropped to later subscribers."""
        if kind == "platform" or len(self._init_events) < self._init_limit:
            self._init_events.append(event)
            return
        counts = self._init_overflow.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += sum(len(b) for b in self._encode((TELEMETRY, "2025-01-29"), event))  # log lines: same in both APIs


class _Subscriber:
    """One subscription's batcher, sender and delivery loop."""

    def __init__(self, name: str, subscription: Subscription, hub: TelemetryHub) -> None:
        self.name = name
        self.api = subscription.api
        self.types = frozenset(subscription.types)
        self.key = (subscription.api, subscription.schema_version)
        self.hub = hub
        self.batcher: Batcher[bytes] = Batcher(subscription.buffering, backoff=hub.backoff)
        destination, timeout, factory = subscription.destination, hub.request_timeout_s, hub.socket_factory
        self.sender = (
            HttpSender(destination, timeout, factory)
            if destination.protocol == "HTTP"
            else TcpSender(destination, timeout, factory)
        )
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task = hub.tasks.create_task(self._run(), name=f"telemetry:{name}")

    def offer(self, blobs: list[bytes], now: float) -> None:
        for blob in blobs:
            self.offer_one(blob, now)

    def offer_one(self, blob: bytes, now: float) -> None:
        """Buffer one record, and wake the loop if it now has something to do (it sleeps while nothing was)."""
        batcher = self.batcher
        was_empty = not batcher.buffered
        batcher.add(blob, len(blob), now)
        if not self._wake.is_set() and (was_empty or batcher.due(now)):
            self._wake.set()

    def wait_settled(self) -> asyncio.Future[None] | None:
        target = self.batcher.last_seq
        if self.batcher.settled(target):
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._wake.set()
        return waiter

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def stats(self) -> SubscriberStats:
        b = self.batcher
        return SubscriberStats(
            self.api, b.produced, b.delivered, b.dropped_records, b.dropped_bytes, b.buffered, b.failures, b.undelivered
        )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for _, waiter in self._waiters:  # a flush waiting on this subscriber has nothing more to wait for
            if not waiter.done():
                waiter.set_result(None)
        await self.sender.close()
        self._tell_undelivered()

    def _tell_undelivered(self) -> None:
        """The records this subscriber will never get, said once as it ends (its listener is gone, or going)."""
        undelivered, unreported = self.batcher.undelivered, self.batcher.unreported
        if (undelivered or unreported) and self.hub.on_undelivered is not None:
            text = f"lambdabox: {undelivered} records for extension {self.name} were not delivered before shutdown"
            if unreported:
                text += f"; {unreported} records dropped earlier were never reported to it (platform.logsDropped)"
            self.hub.on_undelivered(text)

    async def _run(self) -> None:
        try:
            await self._deliver()
        except Exception as error:  # a bug of lambdabox's: this subscriber gets nothing more, the rest go on
            print(f"lambdabox: delivery to {self.name} stopped: {error!r}", file=sys.stderr, flush=True)

    async def _deliver(self) -> None:
        batcher, clock, thawed = self.batcher, self.hub.clock, self.hub.thawed
        while True:
            self._wake.clear()
            now = clock()
            batcher.report_drops(self._drop_report, now)
            self._settle_waiters()
            if not batcher.due(now, flushing=bool(self._waiters)):
                deadline = batcher.next_deadline()
                await _wait(self._wake, IDLE_S if deadline is None else max(0.0, deadline - now))
                continue
            if not thawed.is_set():
                await _wait(thawed, IDLE_S)
                continue
            self._idle.clear()
            try:
                delivered = await self.sender.send(batcher.take())
            finally:
                self._idle.set()
            if delivered:
                batcher.ack()
            elif batcher.failed(clock()) == self.hub.failing_after and self.hub.on_failing is not None:
                self.hub.on_failing(self.name)

    def _settle_waiters(self) -> None:
        keep = []
        for target, waiter in self._waiters:
            if waiter.done():
                continue
            if self.batcher.settled(target):
                waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._waiters = keep

    def _drop_report(self, records: int, nbytes: int) -> tuple[bytes, int]:
        event = {"time": iso_time(self.hub.epoch()), "type": "platform.logsDropped"}
        blob = encode({**event, "record": dropped_record(records, nbytes)})
        return blob, len(blob)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


@contextlib.asynccontextmanager
async def open_telemetry_hub(**settings: Any) -> AsyncIterator[TelemetryHub]:
    """A :class:`TelemetryHub` (``settings`` as its keyword arguments) owning the group of its delivery loops; on exit
    every loop is stopped and every connection closed."""
    async with open_task_group() as tasks:
        hub = TelemetryHub(tasks, **settings)
        try:
            yield hub
        finally:
            await hub.close()
