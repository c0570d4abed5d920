"""Telemetry delivery against real subscribers: aiohttp HTTP servers and TCP listeners in the test, no mocks of the
hub. Arrays and NDJSON, retries after refusals, drops with exact counts, bounded memory, flush, subscription rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from lambdabox.core.batching import Backoff
from lambdabox.core.telemetry import (
    Subscription,
    encode,
    parse_logs_subscription,
    parse_telemetry_subscription,
    render,
    subscription_record,
)
from lambdabox.environment.delivery import TelemetryHub, open_telemetry_hub
from lambdabox.environment.report import TelemetryEvent
from support import run

T0 = 1_700_000_000.0
FAST = Backoff(first_s=0.005, cap_s=0.02)
WAIT_S = 10.0
HELD_S = 100.0  # request timeout while a test holds the subscriber's answer: a timed-out POST is resent


def line(i: int, text: str = "line") -> TelemetryEvent:
    return TelemetryEvent(T0 + i / 1000, "function", f"{text} {i}", "runtime")


def telemetry(
    destination: dict[str, Any], types: tuple[str, ...] = ("platform", "function"), **buffering: int
) -> Subscription:
    body = {"schemaVersion": "2022-12-13", "types": list(types), "destination": destination}
    return parse_telemetry_subscription({**body, "buffering": {"timeoutMs": 25, **buffering}})


def logs(destination: dict[str, Any], **buffering: int) -> Subscription:
    body = {"schemaVersion": "2021-03-18", "types": ["platform", "function"], "destination": destination}
    return parse_logs_subscription({**body, "buffering": {"timeoutMs": 25, **buffering}})


async def wait_until(condition: Callable[[], bool], changed: asyncio.Event) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            changed.clear()
            await changed.wait()


@dataclass
class HttpSubscriber:
    """A subscriber's HTTP listener: refuses the first ``refuse`` POSTs with 500, holds each answer until ``gate``."""

    refuse: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    posts: list[list[dict[str, Any]]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    requests: list[web.Request] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        batch = await request.json()
        self.posts.append(batch)
        self.requests.append(request)
        self.changed.set()
        await self.gate.wait()
        if len(self.posts) <= self.refuse:
            return web.Response(status=500, text="not now")
        self.accepted.extend(batch)
        self.changed.set()
        return web.Response(text="OK")

    def uri(self, path: str = "/telemetry") -> dict[str, Any]:
        return {"protocol": "HTTP", "URI": f"http://sandbox.localdomain:{self.port}{path}"}

    def of_type(self, type_: str) -> list[Any]:
        return [r["record"] for r in self.accepted if r["type"] == type_]

    def dropped(self) -> int:
        return sum(r["droppedRecords"] for r in self.of_type("platform.logsDropped"))


@contextlib.asynccontextmanager
async def open_http(subscriber: HttpSubscriber | None = None) -> AsyncIterator[HttpSubscriber]:
    subscriber = subscriber or HttpSubscriber()
    subscriber.gate.set()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", subscriber.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    subscriber.port = runner.addresses[0][1]
    try:
        yield subscriber
    finally:
        subscriber.gate.set()
        await runner.cleanup()


@dataclass
class TcpSubscriber:
    lines: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    hang_up_after: int | None = None  # close the first connection after this many lines
    hung_up: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            while raw := await reader.readline():
                self.lines.append(json.loads(raw))
                self.changed.set()
                if first and self.hang_up_after is not None and len(self.lines) >= self.hang_up_after:
                    self.hung_up = True
                    break
        finally:
            writer.close()
            self.changed.set()


@contextlib.asynccontextmanager
async def open_tcp(subscriber: TcpSubscriber) -> AsyncIterator[int]:
    server = await asyncio.start_server(subscriber.handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def open_hub(**options: Any) -> AsyncIterator[TelemetryHub]:
    """A hub as an environment has it at the start of an Init (OpenSubscriptions carried out)."""
    async with open_telemetry_hub(backoff=FAST, **options) as hub:
        hub.open_init()
        yield hub


def end_init(hub: TelemetryHub) -> None:
    """What the environment does at the end of Init: emit platform.initReport, then CloseSubscriptions."""
    record = {"initializationType": "on-demand", "phase": "init", "status": "success", "metrics": {"durationMs": 1.0}}
    hub.observe(TelemetryEvent(T0, "platform.initReport", record))
    hub.close_init()


async def flush(hub: TelemetryHub) -> None:
    async with asyncio.timeout(WAIT_S):
        await hub.flush()


# ---- delivery -----------------------------------------------------------------------------------------------------


def test_http_delivers_json_arrays_in_order_to_the_sandbox_destination() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub() as hub:
            hub.subscribe("ext", telemetry(server.uri("/in?x=1")))
            hub.observe(TelemetryEvent(T0, "platform.start", {"requestId": "r1", "version": "$LATEST"}))
            for i in range(5):
                hub.observe(line(i))
            hub.observe(TelemetryEvent(T0, "extension", "not subscribed", "ext"))
            await wait_until(lambda: len(server.accepted) == 6, server.changed)
            request = server.requests[0]
            assert request.path_qs == "/in?x=1"
            assert request.headers["Host"] == f"sandbox.localdomain:{server.port}"
            assert request.headers["Content-Type"] == "application/json"
            assert server.accepted[0] == {
                "time": "2023-11-14T22:13:20.000Z",
                "type": "platform.start",
                "record": {"requestId": "r1", "version": "$LATEST"},
            }
            assert server.of_type("function") == [f"line {i}" for i in range(5)]
            await flush(hub)
            stats = hub.stats()["ext"]
            assert (stats.produced, stats.delivered, stats.dropped_records, stats.buffered) == (6, 6, 0, 0)

    run(scenario())


def test_tcp_delivers_ndjson_in_the_logs_api_shapes() -> None:
    async def scenario() -> None:
        listener = TcpSubscriber()
        async with open_tcp(listener) as port, open_hub() as hub:
            hub.subscribe("ext", logs({"protocol": "TCP", "port": port}))
            hub.observe(line(0))
            report = {"requestId": "r1", "status": "success", "metrics": {"durationMs": 1.0, "billedDurationMs": 1}}
            hub.observe(TelemetryEvent(T0, "platform.runtimeDone", {"requestId": "r1", "status": "success"}))
            hub.observe(TelemetryEvent(T0, "platform.report", report))
            await wait_until(lambda: len(listener.lines) == 4, listener.changed)
            types = [entry["type"] for entry in listener.lines]
            assert types == ["function", "platform.runtimeDone", "platform.end", "platform.report"]
            assert listener.lines[3]["record"] == {"requestId": "r1", "metrics": report["metrics"]}
            assert listener.connections == 1

    run(scenario())


def test_tcp_reconnects_after_the_listener_hangs_up() -> None:
    async def scenario() -> None:
        listener = TcpSubscriber(hang_up_after=1)
        async with open_tcp(listener) as port, open_hub() as hub:
            hub.subscribe("ext", telemetry({"protocol": "TCP", "port": port}, ("function",)))
            hub.observe(line(0))
            await wait_until(lambda: listener.hung_up, listener.changed)
            i = 1
            while listener.connections < 2:  # TCP has no acknowledgement: what goes out before the reset is lost
                hub.observe(line(i))
                await flush(hub)
                i += 1
            for j in range(i, i + 3):
                hub.observe(line(j))
            await wait_until(lambda: listener.lines[-1]["record"] == f"line {i + 2}", listener.changed)
            assert [entry["record"] for entry in listener.lines[-3:]] == [f"line {j}" for j in range(i, i + 3)]
            assert listener.connections == 2

    run(scenario())


def test_a_refused_delivery_is_resent_from_the_last_acknowledged_record() -> None:
    async def scenario() -> None:
        async with open_http(HttpSubscriber(refuse=3)) as server, open_hub() as hub:
            hub.subscribe("ext", telemetry(server.uri(), maxItems=1_000))
            for i in range(2_500):
                hub.observe(line(i))
            await flush(hub)
            assert [len(post) for post in server.posts[:4]] == [1_000] * 4  # the same first batch, four times
            assert all(post == server.posts[0] for post in server.posts[:4])
            assert server.of_type("function") == [f"line {i}" for i in range(2_500)]  # nothing lost or repeated
            assert hub.stats()["ext"].failures == 0

    run(scenario())


def test_a_slow_subscriber_makes_records_drop_with_exact_counts() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        async with open_http(HttpSubscriber(gate=gate)) as server, open_hub(request_timeout_s=HELD_S) as hub:
            hub.subscribe("ext", telemetry(server.uri(), ("function",), maxItems=1_000))
            end_init(hub)
            gate.clear()
            events = [line(i) for i in range(20_000)]
            for event in events[:10_000]:  # 4 000 fit the queue (4 x maxItems), 6 000 drop
                hub.observe(event)
            await wait_until(lambda: len(server.posts) == 1, server.changed)  # 1 000 in flight, held by the gate
            for event in events[10_000:]:  # the queue is still full: all 10 000 drop
                hub.observe(event)
            assert hub.buffered() == (
                4_000,
                sum(len(encode(render("telemetry", "2022-12-13", e)[0])) for e in events[:4_000]),
            )
            gate.set()
            await flush(hub)
            assert server.of_type("function") == [f"line {i}" for i in range(4_000)]
            (dropped,) = server.of_type("platform.logsDropped")
            lost = events[4_000:10_000] + events[10_000:]
            size = sum(len(encode(render("telemetry", "2022-12-13", e)[0])) for e in lost)
            assert (dropped["droppedRecords"], dropped["droppedBytes"]) == (16_000, size)
            stats = hub.stats()["ext"]
            assert stats.delivered + stats.dropped_records == stats.produced == 20_000

    run(scenario())


def test_memory_stays_bounded_while_a_stuck_subscriber_drops_a_million_records() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        async with open_http(HttpSubscriber(gate=gate)) as server, open_hub(request_timeout_s=HELD_S) as hub:
            hub.subscribe("ext", telemetry(server.uri(), ("function",), maxItems=1_000, maxBytes=262_144))
            end_init(hub)
            gate.clear()
            peak = (0, 0)
            for chunk in range(100):
                for i in range(chunk * 10_000, (chunk + 1) * 10_000):
                    hub.observe(line(i))
                held = hub.buffered()
                peak = max(peak[0], held[0]), max(peak[1], held[1])
                await asyncio.sleep(0)  # let the loop run: it sends one batch and waits for the answer
            assert peak[0] <= 4 * 1_000 and peak[1] <= 4 * 262_144
            gate.set()
            await flush(hub)
            stats = hub.stats()["ext"]
            assert stats.produced == 1_000_000 and stats.buffered == 0
            assert len(server.of_type("function")) + server.dropped() == 1_000_000
            assert server.dropped() == stats.dropped_records == 996_000  # 4 000 fit the queue before the first answer

    run(scenario(), timeout=120)


def test_flush_delivers_everything_buffered_before_timeout_ms() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub() as hub:
            await flush(hub)  # nothing subscribed: returns at once
            hub.subscribe("ext", telemetry(server.uri(), timeoutMs=30_000))
            await flush(hub)  # nothing buffered: returns at once
            for i in range(10):
                hub.observe(line(i))
            await flush(hub)
            assert server.of_type("function") == [f"line {i}" for i in range(10)]
            assert len(server.posts) == 1

    run(scenario())


def test_flush_is_bounded_by_the_callers_deadline_when_nobody_listens() -> None:
    async def scenario() -> None:
        async with open_http() as server:
            port = server.port
        failing: list[str] = []
        async with open_hub(on_failing=failing.append, failing_after=3) as hub:
            hub.subscribe("ext", telemetry({"protocol": "HTTP", "URI": f"http://sandbox:{port}"}))
            hub.observe(line(0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await hub.flush()
            assert failing == ["ext"] and hub.failing() == ["ext"]
            stats = hub.stats()["ext"]
            assert stats.failures >= 3 and stats.buffered == 1 and stats.delivered == 0

    run(scenario())


def test_a_subscriber_that_recovers_is_no_longer_failing() -> None:
    async def scenario() -> None:
        failing: list[str] = []
        async with (
            open_http(HttpSubscriber(refuse=4)) as server,
            open_hub(on_failing=failing.append, failing_after=3) as hub,
        ):
            hub.subscribe("ext", telemetry(server.uri()))
            hub.observe(line(0))
            await flush(hub)
            assert failing == ["ext"] and hub.failing() == []
            assert server.of_type("function") == ["line 0"]

    run(scenario())


def test_json_log_format_delivers_object_records() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub(json_function_logs=True) as hub:
            hub.subscribe("ext", telemetry(server.uri()))
            hub.observe(TelemetryEvent(T0, "function", '{"level": "INFO", "message": "hi"}', "runtime"))
            hub.observe(TelemetryEvent(T0, "function", "print output", "runtime"))
            await flush(hub)
            assert server.of_type("function") == [{"level": "INFO", "message": "hi"}, "print output"]

    run(scenario())


# ---- subscriptions ------------------------------------------------------------------------------------------------


def test_init_records_reach_an_extension_that_subscribes_later_in_init() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub() as hub:
            hub.observe(TelemetryEvent(T0, "platform.initStart", {"initializationType": "on-demand", "phase": "init"}))
            hub.observe(TelemetryEvent(T0, "platform.extension", {"name": "ext", "state": "Ready", "events": []}))
            hub.observe(TelemetryEvent(T0, "extension", "starting", "ext"))
            hub.subscribe("ext", telemetry(server.uri()))
            end_init(hub)
            await flush(hub)
            assert [r["type"] for r in server.accepted] == [
                "platform.initStart",
                "platform.extension",
                "platform.initReport",
            ]
            assert hub.buffered() == (0, 0)  # the Init buffer is gone with the Init

    run(scenario())


def test_an_init_that_overflows_its_buffer_is_reported_as_dropped_to_late_subscribers() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub(init_buffer_limit=10) as hub:
            hub.observe(TelemetryEvent(T0, "platform.initStart", {"initializationType": "on-demand", "phase": "init"}))
            for i in range(25):
                hub.observe(line(i))
            hub.observe(TelemetryEvent(T0, "platform.extension", {"name": "ext", "state": "Ready", "events": []}))
            hub.subscribe("ext", telemetry(server.uri()))
            hub.observe(line(25))
            await flush(hub)
            assert server.of_type("function") == [f"line {i}" for i in (*range(9), 25)]
            assert len(server.of_type("platform.initStart")) == len(server.of_type("platform.extension")) == 1
            size = sum(len(encode(render("logs", "2020-08-15", line(i))[0])) for i in range(9, 25))
            assert server.of_type("platform.logsDropped")[0]["droppedBytes"] == size
            assert server.dropped() == 16
            stats = hub.stats()["ext"]
            assert (stats.produced, stats.delivered, stats.dropped_records) == (28, 12, 16)

    run(scenario())


def test_a_new_init_retires_the_previous_inits_subscribers() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub() as hub:
            hub.subscribe("ext", logs(server.uri()))
            hub.observe(line(0))
            await flush(hub)
            end_init(hub)
            hub.open_init()  # the next Init: its processes were restarted, and subscribe again if they will
            assert hub.stats() == {}
            hub.observe(line(1))  # kept for the extensions that subscribe during this Init
            hub.subscribe("ext", telemetry(server.uri()))
            await flush(hub)
            assert server.of_type("function") == ["line 0", "line 1"]
            assert list(hub.stats()) == ["ext"]

    run(scenario())


def test_each_api_gets_its_own_subscription_records() -> None:
    async def scenario() -> None:
        async with open_http() as tel, open_http() as log, open_hub() as hub:
            for name, api, server in (("t", telemetry, tel), ("l", logs, log)):
                subscription = api(server.uri())
                hub.subscribe(name, subscription)
                hub.observe(TelemetryEvent(T0, *subscription_record(subscription.api, name, subscription.types)))
            end_init(hub)
            await flush(hub)
            assert [r["type"] for r in tel.accepted] == [
                "platform.telemetrySubscription",
                "platform.initReport",
            ]
            assert [r["type"] for r in log.accepted] == ["platform.logsSubscription"]

    run(scenario())


def test_nothing_is_delivered_while_the_environment_is_frozen() -> None:
    async def scenario() -> None:
        async with open_http() as server, open_hub() as hub:
            hub.subscribe("ext", telemetry(server.uri(), maxItems=1_000))
            async with asyncio.timeout(WAIT_S):
                await hub.pause()
            for i in range(1_000):  # a full batch: due at once
                hub.observe(line(i))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await hub.flush()
            assert server.posts == [] and hub.buffered()[0] >= 1_000
            hub.resume()
            await flush(hub)
            assert server.of_type("function") == [f"line {i}" for i in range(1_000)]

    run(scenario())


def test_pausing_waits_for_the_delivery_under_way() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        async with open_http(HttpSubscriber(gate=gate)) as server, open_hub() as hub:
            hub.subscribe("ext", telemetry(server.uri(), ("function",)))
            gate.clear()
            hub.observe(line(0))
            await wait_until(lambda: len(server.posts) == 1, server.changed)
            pausing = asyncio.get_running_loop().create_task(hub.pause())
            for _ in range(5):
                await asyncio.sleep(0)  # give it every chance: it must still wait for the answer
            assert not pausing.done()
            gate.set()
            async with asyncio.timeout(WAIT_S):
                await pausing
            assert server.of_type("function") == ["line 0"]
            assert hub.stats()["ext"].delivered == 1
            hub.resume()

    run(scenario())


def test_records_left_at_shutdown_are_counted_and_said() -> None:
    """delivered + dropped + undelivered = produced when the hub closes on a subscriber that fell behind; the
    records never delivered, and the drops never reported, are said once."""

    async def scenario() -> tuple[list[str], int, int]:
        gate, said = asyncio.Event(), []
        async with open_http(HttpSubscriber(gate=gate)) as server:
            async with open_hub(request_timeout_s=HELD_S, on_undelivered=said.append) as hub:
                hub.subscribe("ext", telemetry(server.uri(), ("function",), maxItems=1_000))
                end_init(hub)
                gate.clear()
                for i in range(10_000):  # 4 000 fit the queue, 6 000 drop
                    hub.observe(line(i))
                await wait_until(lambda: len(server.posts) == 1, server.changed)  # 1 000 in flight, held
                stats = hub.stats()["ext"]
                assert (stats.produced, stats.delivered, stats.dropped_records, stats.undelivered) == (
                    10_000, 0, 6_000, 4_000,
                )  # fmt: skip
            # The hub closed with the batch still in flight: the subscriber had acknowledged nothing.
            return said, len(server.accepted), stats.produced

    said, accepted, produced = run(scenario())
    assert accepted == 0 and produced == 10_000
    assert said == [
        "lambdabox: 4000 records for extension ext were not delivered before shutdown; 6000 records dropped earlier "
        "were never reported to it (platform.logsDropped)"
    ]


def test_a_subscriber_that_kept_up_is_said_nothing_of_at_shutdown() -> None:
    async def scenario() -> list[str]:
        said: list[str] = []
        async with open_http() as server:
            async with open_hub(on_undelivered=said.append) as hub:
                hub.subscribe("ext", telemetry(server.uri(), ("function",)))
                end_init(hub)
                for i in range(100):
                    hub.observe(line(i))
                await flush(hub)
            assert len(server.of_type("function")) == 100
        return said

    assert run(scenario()) == []
