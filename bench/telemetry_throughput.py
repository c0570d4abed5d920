"""Telemetry throughput: records per second delivered by ``TelemetryHub`` to each of N HTTP subscribers that keep up.

What is timed: ``--records`` (500,000) ``function`` line events go into ``TelemetryHub.observe()`` (the call the
environment makes for every line a function prints), for ``--subscribers`` (3) Telemetry API subscribers (schema
2025-01-29, types ``function``, buffering maxItems 10,000, maxBytes 1 MiB, timeoutMs 25: Lambda's largest batches,
shortest wait), as three extensions of one environment would subscribe. The hub renders, encodes, batches and POSTs
them; each subscriber is an aiohttp server in a process of its own that parses each POSTed JSON array, counts its
records and answers 200. The figure is records per subscriber / (time from the first ``observe()`` to the moment
the last subscriber has counted them all, by the subscribers' CLOCK_MONOTONIC).

The events themselves (``TelemetryEvent`` objects, what the environment builds from a line) are made before the
clock starts. The producer feeds 1,000 events at a time, yielding to the event loop between chunks, and holds back
while the hub buffers 3 x maxItems or more (the hub drops beyond 4 x maxItems): the subscriber keeps up and nothing
is dropped (checked). So the figure is the most the hub delivers per second, not the speed of a function.

The floor, measured in the same run: the same subscriber processes fed the same records (encoded by lambdabox's
``encode``, before the clock starts), in JSON arrays of the same sizes as the hub's batches of the round just
before (each subscriber reports them: with timeoutMs 25 a batch often goes out before it holds maxItems), by bare
aiohttp client loops in this process, one per subscriber and all at once: one ``ClientSession`` with one connection
each, one POST at a time, each waiting for its answer, as the hub's senders do; no hub. It holds the loopback
transport, aiohttp on both sides and the subscribers' JSON parsing (all of it sharing the machine's cores with the
hub). The target is at least 100,000 records per second delivered to each subscriber; the ratio hub / floor says
how much of the floor's rate the hub keeps.

Rounds: one untimed warm-up of each (50,000 records), then ``--rounds`` timed rounds, each a hub round followed by
its floor round; the table gives the medians and every round.

Run: ``.venv/bin/python bench/telemetry_throughput.py`` (``--records``, ``--rounds``, ``--subscribers`` to change the
counts).
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
from lambdabox.environment.delivery import open_telemetry_hub
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
    seconds: float  # first record handed over -> the last subscriber counted the last one
    records: int  # per subscriber
    posts: int  # per subscriber (median)
    subscriber_cpu: float  # seconds of CPU the subscriber processes used in the round, together
    own_cpu: float  # seconds of CPU this process used in the round
    sizes: list[list[int]]  # records per POST, as each subscriber received them
    observe_s: float = 0.0  # of which inside observe() (hub rounds only)
    dropped: int = 0

    @property
    def rate(self) -> float:
        """Records per second delivered to each subscriber."""
        return self.records / self.seconds


def gathered(t0: float, states: list[dict[str, Any]], own_cpu: float) -> Round:
    counts = {state["count"] for state in states}
    if len(counts) != 1:
        raise RuntimeError(f"the subscribers counted different numbers of records: {sorted(counts)}")
    return Round(
        max(state["t_done"] for state in states) - t0,
        counts.pop(),
        int(statistics.median(state["posts"] for state in states)),
        sum(state["cpu"] for state in states),
        own_cpu,
        [state["sizes"] for state in states],
    )


async def hub_round(subscribers: list[Subscriber], events: list[TelemetryEvent]) -> Round:
    async with open_telemetry_hub() as hub:
        # As in an environment: subscribe during Init, then the Init ends (so log lines are not kept for late
        # subscribers) and the function's lines flow.
        hub.open_init()
        hub.observe(TelemetryEvent(time.time(), "platform.initStart", {"initializationType": "on-demand"}))
        for index, subscriber in enumerate(subscribers):
            destination = Destination("HTTP", subscriber.port, "sandbox.localdomain", "/in")
            hub.subscribe(f"bench-sub-{index}", Subscription(TELEMETRY, SCHEMA, ("function",), destination, BUFFERING))
        hub.observe(TelemetryEvent(time.time(), "platform.initReport", {"initializationType": "on-demand"}))
        hub.close_init()
        for subscriber in subscribers:
            await subscriber.reset(len(events))
        observe, buffered = hub.observe, hub.buffered
        high_water = HIGH_WATER * len(subscribers)
        observe_s = 0.0
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for start in range(0, len(events), CHUNK):
            while buffered()[0] >= high_water:  # noqa: ASYNC110 - the hub has no event for "room in the buffer"
                await asyncio.sleep(0.001)
            t_chunk = time.perf_counter()
            for event in events[start : start + CHUNK]:
                observe(event)
            observe_s += time.perf_counter() - t_chunk
            await asyncio.sleep(0)
        states = await asyncio.gather(*(s.wait(60) for s in subscribers))
        own_cpu = time.process_time() - cpu0
        stats = hub.stats()
    for name, stat in stats.items():
        if stat.produced != len(events) or stat.delivered + stat.dropped_records + stat.buffered != stat.produced:
            raise RuntimeError(f"hub accounting is off for {name}: {stat}")
    result = gathered(t0, states, own_cpu)
    result.observe_s = observe_s
    result.dropped = sum(stat.dropped_records for stat in stats.values())
    return result


async def floor_round(subscribers: list[Subscriber], bodies: list[list[bytes]], records: int) -> Round:
    async def feed(subscriber: Subscriber, posts: list[bytes]) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
            url = f"{subscriber.url}/in"
            for body in posts:
                async with session.post(url, data=body, headers=HEADERS) as answer:
                    await answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"floor POST answered {answer.status}")

    for subscriber in subscribers:
        await subscriber.reset(records)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await asyncio.gather(*(feed(s, b) for s, b in zip(subscribers, bodies, strict=True)))
    states = await asyncio.gather(*(s.wait(60) for s in subscribers))
    return gathered(t0, states, time.process_time() - cpu0)


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


async def main(count: int, rounds: int, fanout: int) -> None:
    print(
        f"telemetry throughput: {count:,} function records to each of {fanout} subscribers, {rounds} timed rounds "
        "after 1 warm-up; "
        f"buffering maxItems {BUFFERING.max_items}, maxBytes {BUFFERING.max_bytes}, timeoutMs {BUFFERING.timeout_ms}; "
        f"load average {load()}"
    )
    events = make_events(count)
    blobs = encoded(events)
    print(f"records: {sum(len(b) for b in blobs) / count:.0f} bytes each on the wire")
    subscribers = list(await asyncio.gather(*(start_subscriber() for _ in range(fanout))))
    try:
        warm = events[: min(count, 50_000)]
        warm_hub = await hub_round(subscribers, warm)
        warm_bodies = [floor_bodies(blobs[: len(warm)], sizes) for sizes in warm_hub.sizes]
        await floor_round(subscribers, warm_bodies, len(warm))
        floors: list[Round] = []
        hubs: list[Round] = []
        for _ in range(rounds):
            hubs.append(await hub_round(subscribers, events))
            bodies = [floor_bodies(blobs, sizes) for sizes in hubs[-1].sizes]
            floors.append(await floor_round(subscribers, bodies, count))
    finally:
        await asyncio.gather(*(stop_subscriber(s) for s in subscribers))
    floor_rate = statistics.median(r.rate for r in floors)
    hub_rate = statistics.median(r.rate for r in hubs)
    print()
    header = (
        f"{'case (median of rounds)':<34} {'records/s':>12} {'ratio':>6} {'per POST':>9} {'own CPU':>8} "
        f"{'sub CPU':>8}   each round"
    )
    print(header)
    print("-" * len(header))
    print(describe(f"floor: {fanout} bare aiohttp POST loops", floors, floor_rate))
    print(describe("TelemetryHub.observe -> subscriber", hubs, floor_rate))
    print()
    observe_us = statistics.median(r.observe_s / r.records * 1e6 for r in hubs)
    print(
        f"inside observe(): {observe_us:.2f} us per record (render, encode, batch), "
        f"{statistics.median(r.observe_s / r.seconds for r in hubs) * 100:.0f}% of the hub rounds' wall time"
    )
    print(f"records dropped by the hub: {sum(r.dropped for r in hubs)} (subscribers that keep up: must be 0)")
    print("records/s: to each subscriber; per POST: records per POST (median subscriber)")
    print(
        "own CPU / sub CPU: CPU time of this process / of the subscriber processes together, "
        "as a share of the round's time"
    )
    print(f"load average after the run: {load()}")
    print()
    verdict = "met" if hub_rate >= TARGET_RPS else "MISSED"
    print(
        f"target: at least {TARGET_RPS:,} records/s delivered to each of {fanout} subscribers: {hub_rate:,.0f} "
        f"records/s, {verdict} "
        f"(ratio to the floor {hub_rate / floor_rate:.2f})"
    )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=3)
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.records, args.rounds, args.subscribers)

    run_loop(bounded())


if __name__ == "__main__":
    run()
