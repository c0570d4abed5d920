"""Telemetry delivery: the hub that fans every environment event out to the Logs and Telemetry API subscribers, and
one dumb asyncio loop per subscriber that sends what its batcher says is due (HTTP POST of a JSON array, or TCP
NDJSON), resends after a failure with backoff, and reports drops. Decisions live in :mod:`lambdabox.core.telemetry` and
:mod:`lambdabox.core.batching`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from lambdabox.core.batching import Backoff, Batcher
from lambdabox.core.errors import ApiError
from lambdabox.core.telemetry import (
    CATEGORIES,
    CLOSED,
    ERROR_TYPE,
    LOGS,
    TELEMETRY,
    Destination,
    EventLike,
    Subscription,
    category,
    dropped_record,
    encode,
    iso_time,
    render,
    subscription_record,
)

REQUEST_TIMEOUT_S = 5.0  # one POST, or one TCP connect + write, before it counts as a failed delivery
FAILING_AFTER = 6  # consecutive failed sends (about 3 s of backoff) before the environment is told
INIT_BUFFER_LIMIT = 10_000  # log lines of the current Init kept for extensions that subscribe later in it
IDLE_S = 60.0  # an idle loop still wakes up now and then: no wait without a deadline
MAX_ANSWER_BYTES = 64 * 1024  # of a subscriber's HTTP answer body; the rest is not read
DEFAULT_BACKOFF = Backoff()

SocketFactory = Callable[[int, int, int], socket.socket]
"""Makes a socket (family, type, proto) where the subscribers listen, such as the environment's network namespace
(:meth:`lambdabox.sandbox.netns.NetNamespace.socket`); without one, connections are made from here."""


@dataclass(frozen=True)
class SubscriberStats:
    """One subscriber's accounting: once nothing is buffered, ``delivered + dropped_records == produced``."""

    api: str
    produced: int
    delivered: int
    dropped_records: int
    dropped_bytes: int
    buffered: int
    failures: int


class TelemetryHub:
    """Every event of one environment goes in through :meth:`observe`; each subscriber gets the records its API,
    schema version and types select. Subscriptions are open from each ``platform.initStart`` to the Init's
    ``platform.initReport``; a new Init retires the previous Init's subscribers (their processes were restarted)."""

    def __init__(
        self,
        *,
        json_function_logs: bool = False,
        on_failing: Callable[[str], None] | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        failing_after: int = FAILING_AFTER,
        backoff: Backoff = DEFAULT_BACKOFF,
        init_buffer_limit: int = INIT_BUFFER_LIMIT,
        epoch: Callable[[], float] = time.time,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.json_function_logs = json_function_logs
        self.socket_factory = socket_factory  # read when a subscriber subscribes
        self.on_failing = on_failing
        self.request_timeout_s = request_timeout_s
        self.failing_after = failing_after
        self.backoff = backoff
        self.epoch = epoch
        self.clock = time.monotonic
        self._init_limit = init_buffer_limit
        self._subscribers: dict[str, _Subscriber] = {}
        self._apis: dict[str, str] = {}  # extension name -> the one API it uses in this Init generation
        self._open = True
        self._closed = False
        self._init_events: list[EventLike] = []
        self._init_overflow: dict[str, list[int]] = {}  # category -> [records, bytes] beyond the Init buffer
        self._retiring: set[asyncio.Task[None]] = set()
        self.thawed = asyncio.Event()  # cleared while the environment is frozen: no delivery starts
        self.thawed.set()

    @property
    def subscriptions_open(self) -> bool:
        return self._open and not self._closed

    # ---- what the environment calls ---------------------------------------------------------------------------

    def observe(self, event: EventLike) -> None:
        """Take one event (synchronous and cheap: render, encode, buffer; the loops do the sending)."""
        type_ = event.type
        if type_ == "platform.initStart":
            self._begin_init()
        kind = category(type_)
        if kind not in CATEGORIES:
            return  # lambdabox's own events (lambdabox.*, the timeline's marks): no API carries them
        if self._open:
            self._remember(event, kind)
        if self._subscribers:
            now = self.clock()
            cache: dict[tuple[str, str], list[bytes]] = {}
            for subscriber in self._subscribers.values():
                if kind in subscriber.types:
                    blobs = cache.get(subscriber.key)
                    if blobs is None:
                        blobs = cache[subscriber.key] = self._encode(subscriber.key, event)
                    subscriber.offer(blobs, now)
        if type_ == "platform.initReport":
            self._open = False
            self._init_events, self._init_overflow = [], {}

    def subscribe(self, extension_name: str, subscription: Subscription) -> tuple[str, dict[str, Any]] | None:
        """Subscribe an extension; returns the ``platform.*Subscription`` (type, record) to emit to every observer,
        or None for a repeated subscription (idempotent: nothing changes). ApiError 403 once Init is over, 400 when
        the extension already uses the other API."""
        api = subscription.api
        if not self.subscriptions_open:
            raise ApiError(403, *CLOSED[api])
        used = self._apis.get(extension_name)
        if used == api:
            return None
        if used is not None:
            names = {LOGS: "Logs", TELEMETRY: "Telemetry"}
            message = f"extension {extension_name} already subscribed through the {names[used]} API; an extension"
            raise ApiError(400, ERROR_TYPE[api], f"{message} may use only one of the Logs and Telemetry APIs")
        self._apis[extension_name] = api
        subscriber = self._subscribers[extension_name] = _Subscriber(extension_name, subscription, self)
        now = self.clock()
        for event in self._init_events:
            if category(event.type) in subscriber.types:
                subscriber.offer(self._encode(subscriber.key, event), now)
        for kind, (records, nbytes) in self._init_overflow.items():
            if kind in subscriber.types:
                subscriber.batcher.count_dropped(records, nbytes)
        return subscription_record(api, extension_name, subscription.types)

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
        self._closed = True
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        await asyncio.gather(*(s.close() for s in subscribers), *self._retiring)

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

    def _begin_init(self) -> None:
        self._open = True
        self._init_events, self._init_overflow = [], {}
        self._apis = {}
        retired, self._subscribers = list(self._subscribers.values()), {}
        for subscriber in retired:
            task = asyncio.get_running_loop().create_task(subscriber.close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

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
            _HttpSender(destination, timeout, factory)
            if destination.protocol == "HTTP"
            else _TcpSender(destination, timeout, factory)
        )
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"telemetry:{name}")

    def offer(self, blobs: list[bytes], now: float) -> None:
        batcher = self.batcher
        was_empty = not batcher.buffered
        for blob in blobs:
            batcher.add(blob, len(blob), now)
        if (was_empty or batcher.due(now)) and not self._wake.is_set():
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
            self.api, b.produced, b.delivered, b.dropped_records, b.dropped_bytes, b.buffered, b.failures
        )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for _, waiter in self._waiters:  # a flush waiting on this subscriber has nothing more to wait for
            if not waiter.done():
                waiter.set_result(None)
        await self.sender.close()

    async def _run(self) -> None:
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
                asyncio.get_running_loop().call_soon(self.hub.on_failing, self.name)  # its errors stay its own

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


class _HttpSender:
    """POSTs a JSON array and waits for the answer: 2xx is delivered, anything else (or no answer) failed."""

    def __init__(self, destination: Destination, timeout_s: float, factory: SocketFactory | None = None) -> None:
        host, port = destination.connect_host, destination.port
        self._factory = factory
        self._url = URL(f"http://{_bracket(host)}:{port}{destination.path}", encoded=True)
        self._headers = {"Content-Type": "application/json", "Host": f"{_bracket(destination.host)}:{port}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, batch: list[bytes]) -> bool:
        if self._session is None:
            factory = self._factory
            connector = aiohttp.TCPConnector(
                limit=1, socket_factory=None if factory is None else (lambda info: factory(*info[:3]))
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        body = b"[" + b",".join(batch) + b"]"
        try:
            async with self._session.post(self._url, data=body, headers=self._headers) as response:
                await response.content.read(MAX_ANSWER_BYTES)
                return 200 <= response.status < 300
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _TcpSender:
    """Writes NDJSON on one connection, reconnecting after a failure. TCP has no acknowledgement: a write the
    kernel accepted counts as delivered (AWS documents the same limitation)."""

    def __init__(self, destination: Destination, timeout_s: float, factory: SocketFactory | None = None) -> None:
        self._host, self._port, self._timeout = destination.connect_host, destination.port, timeout_s
        self._factory = factory
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, batch: list[bytes]) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                if self._writer is None or self._writer.is_closing() or (self._reader and self._reader.at_eof()):
                    await self.close()
                    self._reader, self._writer = await self._connect()
                self._writer.write(b"\n".join(batch) + b"\n")
                await self._writer.drain()
            return True
        except (OSError, TimeoutError):
            await self.close()
            return False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._factory is None:
            return await asyncio.open_connection(self._host, self._port)
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET  # a loopback address (Destination)
        sock = self._factory(family, socket.SOCK_STREAM, 0)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (self._host, self._port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
