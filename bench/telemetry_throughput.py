"""Telemetry throughput: records per second delivered by ``TelemetryHub`` to one HTTP subscriber that keeps up.

What is timed: ``--records`` (500,000) ``function`` line events go into ``TelemetryHub.observe()`` (the call the
environment makes for every line a function prints), for one Telemetry API subscriber (schema 2025-01-29, types
``function``, buffering maxItems 10,000, maxBytes 1 MiB, timeoutMs 25: Lambda's largest batches, shortest wait). The
hub renders, encodes, batches and POSTs them; the subscriber is an aiohttp server in a separate process that parses
each POSTed JSON array, counts its records and answers 200. The figure is records / (time from the first
``observe()`` to the moment the subscriber has counted them all, by the subscriber's CLOCK_MONOTONIC).

The events themselves (``TelemetryEvent`` objects, what the environment builds from a line) are made before the
clock starts. The producer feeds 1,000 events at a time, yielding to the event loop between chunks, and holds back
while the hub buffers 3 x maxItems or more (the hub drops beyond 4 x maxItems): the subscriber keeps up and nothing
is dropped (checked). So the figure is the most the hub delivers per second, not the speed of a function.

The floor, measured in the same run: the same subscriber process fed the same records (encoded by lambdabox's
``encode``, before the clock starts), in JSON arrays of the same sizes as the hub's batches of the round just
before (the subscriber reports them: with timeoutMs 25 a batch often goes out before it holds maxItems), by a bare
aiohttp client loop in this process: one ``ClientSession`` with one connection, one POST at a time, each waiting
for its answer, as the hub's sender does; no hub. It holds the loopback transport, aiohttp on both sides and the
subscriber's JSON parsing. The target is at least 100,000 records per second delivered; the ratio hub / floor
says how much of the floor's rate the hub keeps.

Rounds: one untimed warm-up of each (50,000 records), then ``--rounds`` timed rounds, each a hub round followed by
its floor round; the table gives the medians and every round.

Run: ``.venv/bin/python bench/telemetry_throughput.py`` (``--records``, ``--rounds`` to change the counts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from lambdabox.core.telemetry import TELEMETRY, Buffering, Destination, Subscription, encode, render
from lambdabox.environment.delivery import TelemetryHub
from lambdabox.environment.report import TelemetryEvent
from lambdabox.loop import run as run_loop

BUDGET_S = 110.0  # the whole run, so the script always ends by itself
TARGET_RPS = 100_000
SCHEMA = "2025-01-29"
BUFFERING = Buffering(max_items=10_000, max_bytes=1_048_576, timeout_ms=25)
CHUNK = 1_000  # events fed between two yields to the event loop
HIGH_WATER = 3 * BUFFERING.max_items  # the producer waits while the hub buffers this many (it drops at 4 x)
HEADERS = {"Content-Type": "application/json"}

# The subscriber: its own process, its own event loop. POST /in counts records; /reset arms a target; /wait
# answers once the target is reached, with the CLOCK_MONOTONIC time it was reached and the CPU time used.
SUBSCRIBER = """\
import asyncio, json, sys, time
from aiohttp import web

state = {"count": 0, "posts": 0, "sizes": [], "target": 0, "t_first": None, "t_done": None, "cpu0": 0.0, "cpu": 0.0}
reached = asyncio.Event()

async def receive(request):
    body = await request.read()
    records = json.loads(body)
    if state["t_first"] is None:
        state["t_first"] = time.monotonic()
    state["posts"] += 1
    state["count"] += len(records)
    state["sizes"].append(len(records))
    if state["count"] >= state["target"] and state["t_done"] is None:
        state["t_done"] = time.monotonic()
        state["cpu"] = time.process_time() - state["cpu0"]
        reached.set()
    return web.Response(text="OK")

async def reset(request):
    state.update(count=0, posts=0, sizes=[], target=int(request.query["target"]), t_first=None, t_done=None)
    state["cpu0"] = time.process_time()
    reached.clear()
    return web.json_response(state)

async def wait(request):
    await reached.wait()
    return web.json_response(state)

async def main():
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/in", receive), web.get("/reset", reset), web.get("/wait", wait)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def load() -> str:
    """The machine's load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- the subscriber process ------------------------------------------------------------------------------


@dataclass
class Subscriber:
    process: asyncio.subprocess.Process
    port: int
    control: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def reset(self, target: int) -> None:
        async with self.control.get(f"{self.url}/reset", params={"target": str(target)}) as answer:
            answer.raise_for_status()

    async def wait(self, seconds: float) -> dict[str, Any]:
        async with asyncio.timeout(seconds), self.control.get(f"{self.url}/wait") as answer:
            answer.raise_for_status()
            state: dict[str, Any] = await answer.json()
            return state


async def start_subscriber() -> Subscriber:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        port = int(await process.stdout.readline())
    return Subscriber(process, port, aiohttp.ClientSession())


async def stop_subscriber(subscriber: Subscriber) -> None:
    await subscriber.control.close()
    if subscriber.process.returncode is None:
        subscriber.process.terminate()
    async with asyncio.timeout(10):
        await subscriber.process.wait()


# ---- the records -----------------------------------------------------------------------------------------


def make_events(count: int) -> list[TelemetryEvent]:
    """Function lines of about 40 characters (about 100 bytes as records), one millisecond apart."""
    t0 = time.time()
    return [
        TelemetryEvent(t0 + i / 1000, "function", f"{i:07d} GET /orders/{i % 977:03d} 200 {i % 83}ms", "runtime")
        for i in range(count)
    ]


def encoded(events: list[TelemetryEvent]) -> list[bytes]:
    """The records as the hub puts them on the wire (lambdabox's ``render`` and ``encode``)."""
    return [encode(record) for event in events for record in render(TELEMETRY, SCHEMA, event)]


def floor_bodies(blobs: list[bytes], sizes: list[int]) -> list[bytes]:
    """JSON arrays holding the records in batches of the given sizes (those the hub sent, in its order)."""
    bodies, start = [], 0
    for size in sizes:
        bodies.append(b"[" + b",".join(blobs[start : start + size]) + b"]")
        start += size
    if start != len(blobs):
        raise RuntimeError(f"batch sizes cover {start} records of {len(blobs)}")
    return bodies


# ---- one round of each -----------------------------------------------------------------------------------


@dataclass
class Round:
    seconds: float  # first record handed over -> the subscriber counted the last one
    records: int
    posts: int
    subscriber_cpu: float  # seconds of CPU the subscriber process used in the round
    own_cpu: float  # seconds of CPU this process used in the round
    sizes: list[int]  # records per POST, as the subscriber received them
    observe_s: float = 0.0  # of which inside observe() (hub rounds only)
    dropped: int = 0

    @property
    def rate(self) -> float:
        return self.records / self.seconds


async def hub_round(subscriber: Subscriber, events: list[TelemetryEvent]) -> Round:
    hub = TelemetryHub()
    # As in an environment: subscribe during Init, then the Init ends (so log lines are not kept for late
    # subscribers) and the function's lines flow.
    hub.observe(TelemetryEvent(time.time(), "platform.initStart", {"initializationType": "on-demand"}))
    destination = Destination("HTTP", subscriber.port, "sandbox.localdomain", "/in")
    hub.subscribe("bench-sub", Subscription(TELEMETRY, SCHEMA, ("function",), destination, BUFFERING))
    hub.observe(TelemetryEvent(time.time(), "platform.initReport", {"initializationType": "on-demand"}))
    await subscriber.reset(len(events))
    observe, buffered = hub.observe, hub.buffered
    observe_s = 0.0
    cpu0 = time.process_time()
    t0 = time.monotonic()
    for start in range(0, len(events), CHUNK):
        while buffered()[0] >= HIGH_WATER:  # noqa: ASYNC110 - the hub has no event for "room in the buffer"
            await asyncio.sleep(0.001)
        t_chunk = time.perf_counter()
        for event in events[start : start + CHUNK]:
            observe(event)
        observe_s += time.perf_counter() - t_chunk
        await asyncio.sleep(0)
    state = await subscriber.wait(60)
    own_cpu = time.process_time() - cpu0
    stats = hub.stats()["bench-sub"]
    await hub.close()
    if stats.produced != len(events) or stats.delivered + stats.dropped_records + stats.buffered != stats.produced:
        raise RuntimeError(f"hub accounting is off: {stats}")
    return Round(
        state["t_done"] - t0,
        state["count"],
        state["posts"],
        state["cpu"],
        own_cpu,
        state["sizes"],
        observe_s,
        stats.dropped_records,
    )


async def floor_round(subscriber: Subscriber, bodies: list[bytes], records: int) -> Round:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        url = f"{subscriber.url}/in"
        await subscriber.reset(records)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for body in bodies:
            async with session.post(url, data=body, headers=HEADERS) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"floor POST answered {answer.status}")
        state = await subscriber.wait(60)
        own_cpu = time.process_time() - cpu0
    return Round(state["t_done"] - t0, state["count"], state["posts"], state["cpu"], own_cpu, state["sizes"])


# ---- main ------------------------------------------------------------------------------------------------


def describe(name: str, rounds: list[Round], floor_rate: float) -> str:
    rate = statistics.median(r.rate for r in rounds)
    each = ", ".join(f"{r.rate / 1000:.0f}k" for r in rounds)
    per_post = statistics.median(r.records / r.posts for r in rounds)
    sub_cpu = statistics.median(r.subscriber_cpu / r.seconds for r in rounds)
    own_cpu = statistics.median(r.own_cpu / r.seconds for r in rounds)
    return (
        f"{name:<34} {rate:>12,.0f} {rate / floor_rate:>6.2f} {per_post:>9,.0f} {own_cpu * 100:>7.0f}% "
        f"{sub_cpu * 100:>7.0f}%   {each}"
    )


async def main(count: int, rounds: int) -> None:
    print(
        f"telemetry throughput: {count:,} function records, {rounds} timed rounds after 1 warm-up; "
        f"buffering maxItems {BUFFERING.max_items}, maxBytes {BUFFERING.max_bytes}, timeoutMs {BUFFERING.timeout_ms}; "
        f"load average {load()}"
    )
    events = make_events(count)
    blobs = encoded(events)
    print(f"records: {sum(len(b) for b in blobs) / count:.0f} bytes each on the wire")
    subscriber = await start_subscriber()
    try:
        warm = events[: min(count, 50_000)]
        warm_hub = await hub_round(subscriber, warm)
        await floor_round(subscriber, floor_bodies(blobs[: len(warm)], warm_hub.sizes), len(warm))
        floors: list[Round] = []
        hubs: list[Round] = []
        for _ in range(rounds):
            hubs.append(await hub_round(subscriber, events))
            floors.append(await floor_round(subscriber, floor_bodies(blobs, hubs[-1].sizes), count))
    finally:
        await stop_subscriber(subscriber)
    floor_rate = statistics.median(r.rate for r in floors)
    hub_rate = statistics.median(r.rate for r in hubs)
    print()
    header = (
        f"{'case (median of rounds)':<34} {'records/s':>12} {'ratio':>6} {'per POST':>9} {'own CPU':>8} "
        f"{'sub CPU':>8}   each round"
    )
    print(header)
    print("-" * len(header))
    print(describe("floor: bare aiohttp POST loop", floors, floor_rate))
    print(describe("TelemetryHub.observe -> subscriber", hubs, floor_rate))
    print()
    observe_us = statistics.median(r.observe_s / r.records * 1e6 for r in hubs)
    print(
        f"inside observe(): {observe_us:.2f} us per record (render, encode, batch), "
        f"{statistics.median(r.observe_s / r.seconds for r in hubs) * 100:.0f}% of the hub rounds' wall time"
    )
    print(f"records dropped by the hub: {sum(r.dropped for r in hubs)} (a subscriber that keeps up: must be 0)")
    print("own CPU / sub CPU: CPU time of this process / of the subscriber process, as a share of the round's time")
    print(f"load average after the run: {load()}")
    print()
    verdict = "met" if hub_rate >= TARGET_RPS else "MISSED"
    print(
        f"target: at least {TARGET_RPS:,} records/s delivered: {hub_rate:,.0f} records/s, {verdict} "
        f"(ratio to the floor {hub_rate / floor_rate:.2f})"
    )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.records, args.rounds)

    run_loop(bounded())


if __name__ == "__main__":
    run()
