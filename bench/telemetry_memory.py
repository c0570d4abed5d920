"""Telemetry memory: this process's RSS while ``TelemetryHub`` drops 1,000,000 records for a slow HTTP subscriber.

What is measured: ``--records`` (1,000,000) ``function`` line events (about 100 bytes each as records) go into
``TelemetryHub.observe()``, 1,000 at a time with a yield to the event loop between chunks, as fast as this process
makes them, for one Telemetry API subscriber (types ``function``, buffering maxItems 10,000, maxBytes 1 MiB,
timeoutMs 25: the largest buffers Lambda allows, so the largest bound) whose listener, an aiohttp server in a
separate process, answers each POST only after ``--delay-s`` (1 s). The hub cannot deliver more than one batch per
second, so nearly every record is dropped, and must be counted, not kept. The RSS of this process (psutil) is
sampled at 0, 100k, 250k, 500k, 750k and 1M records fed, every 10,000 records for the peak, after the hub has
flushed (every buffered record delivered, every drop reported in a ``platform.logsDropped`` record) and after it
is closed. At each sample the hub's accounting is checked: delivered + dropped + buffered == produced, where
``buffered`` is taken without the ``platform.logsDropped`` records waiting in the buffer (the hub's ``buffered``
counts them, though they are not produced records). At the end the subscriber's own count is checked too:
function records received + the droppedRecords of the ``platform.logsDropped`` records received == records fed.

The floor, measured in the same run: the RSS of this same process before the hub existed (imports done, event
loop running, subscriber process started). The hub's queue is full (4 x maxItems records, or 4 x maxBytes bytes)
after about 40,000 records; from then on a record may only be counted, so the RSS must not grow with the records
fed. "Memory flat while dropping" is read as: the RSS grows by less than 4 MiB (the hub's own bound on the bytes it
buffers, 4 x maxBytes) from 100k records to 1M records, while about 85 MiB of records are dropped. The growth from
500k to 1M is printed too. What may still grow after 100k is the sender's working set, built at the first
deliveries, which with a 1 s subscriber come after 100k records are fed: a body of up to maxBytes, its pieces and
aiohttp's copies, which glibc's malloc keeps for reuse once a freed block of that size has raised its mmap threshold.

Run: ``.venv/bin/python bench/telemetry_memory.py`` (``--records``, ``--delay-s`` to change them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

from lambdabox.core.telemetry import TELEMETRY, Buffering, Destination, Subscription
from lambdabox.environment.delivery import SubscriberStats, TelemetryHub, open_telemetry_hub
from lambdabox.environment.report import TelemetryEvent
from lambdabox.loop import run as run_loop

BUDGET_S = 110.0  # the whole run, so the script always ends by itself
MIB = 1024 * 1024
BUFFERING = Buffering(max_items=10_000, max_bytes=1_048_576, timeout_ms=25)
CHUNK = 1_000  # events fed between two yields to the event loop
PEAK_EVERY = 10_000
CHECKPOINTS = (100_000, 250_000, 500_000, 750_000, 1_000_000)
FLAT_MIB = 4.0  # the hub's bound on buffered bytes at this maxBytes (4 x 1 MiB)

# The slow subscriber: its own process. POST /in reads the body, waits DELAY seconds, counts and answers 200;
# GET /state tells what it counted.
SUBSCRIBER = """\
import asyncio, json, sys
from aiohttp import web

DELAY = float(sys.argv[1])
state = {"posts": 0, "function": 0, "dropped_records": 0, "drop_reports": 0}

async def receive(request):
    body = await request.read()
    await asyncio.sleep(DELAY)
    state["posts"] += 1
    for record in json.loads(body):
        if record["type"] == "function":
            state["function"] += 1
        elif record["type"] == "platform.logsDropped":
            state["drop_reports"] += 1
            state["dropped_records"] += record["record"]["droppedRecords"]
    return web.Response(text="OK")

async def report(request):
    return web.json_response(state)

async def main():
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/in", receive), web.get("/state", report)])
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


def mib(nbytes: float) -> float:
    return nbytes / MIB


def drop_reports_buffered(hub: TelemetryHub) -> int:
    """``platform.logsDropped`` records in the subscriber's buffer: ``buffered`` counts them, though they are not
    produced records. This reaches into private attributes; should they go away, the check counts them as 0."""
    subscriber = getattr(hub, "_subscribers", {}).get("bench-sub")
    return int(getattr(getattr(subscriber, "batcher", None), "_reports_outstanding", 0))


class Sampler:
    """RSS samples of this process, with the hub's accounting checked at each."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.rows: list[tuple[str, int, str]] = []
        self.mismatches: list[str] = []

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def sample(self, label: str, hub: TelemetryHub | None, fed: int) -> int:
        rss = self.rss()
        accounting = ""
        if hub is not None and (stats := hub.stats().get("bench-sub")) is not None:
            reports = drop_reports_buffered(hub)
            raw = stats.delivered + stats.dropped_records + stats.buffered
            ok = raw - reports == stats.produced == fed
            accounting = (
                f"{stats.delivered:>9,} {stats.dropped_records:>9,} {stats.buffered:>8,} {reports:>7} "
                f"{stats.produced:>9,} {raw - stats.produced:>+7} {'ok' if ok else 'MISMATCH':>8}"
            )
            if not ok:
                self.mismatches.append(f"{label}: {stats}, {reports} drop reports buffered, {fed} fed")
        self.rows.append((label, rss, accounting))
        return rss


@dataclass
class Run:
    floor: int
    at: dict[int, int]  # records fed -> RSS
    peak_feed: int
    feed_s: float
    flush_s: float
    final: SubscriberStats
    seen: dict[str, Any]


async def start_subscriber(delay_s: float) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SUBSCRIBER, str(delay_s), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        port = int(await process.stdout.readline())
    return process, port


async def subscriber_state(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/state") as answer:
        state: dict[str, Any] = await answer.json()
        return state


async def measure(sampler: Sampler, port: int, count: int) -> Run:
    floor = sampler.sample("floor: before the hub existed", None, 0)
    async with open_telemetry_hub() as hub:
        # As in an environment: subscribe during Init, then the Init ends and the function's lines flow.
        hub.observe(TelemetryEvent(time.time(), "platform.initStart", {"initializationType": "on-demand"}))
        destination = Destination("HTTP", port, "sandbox.localdomain", "/in")
        hub.subscribe("bench-sub", Subscription(TELEMETRY, "2025-01-29", ("function",), destination, BUFFERING))
        hub.observe(TelemetryEvent(time.time(), "platform.initReport", {"initializationType": "on-demand"}))
        sampler.sample("0 records", hub, 0)
        at: dict[int, int] = {}
        checkpoints = {c for c in CHECKPOINTS if c < count} | {count}
        observe, peak_feed = hub.observe, 0
        t0 = time.monotonic()
        for start in range(0, count, CHUNK):
            now = time.time()
            for i in range(start, min(start + CHUNK, count)):
                observe(TelemetryEvent(now, "function", f"{i:07d} GET /orders/{i % 977:03d} 200 {i % 83}ms", "runtime"))
            fed = min(start + CHUNK, count)
            if fed in checkpoints:
                at[fed] = sampler.sample(f"{fed:,} records", hub, fed)
                peak_feed = max(peak_feed, at[fed])
            if fed % PEAK_EVERY == 0:
                peak_feed = max(peak_feed, sampler.rss())
            await asyncio.sleep(0)
        feed_s = time.monotonic() - t0
        t_flush = time.monotonic()
        async with asyncio.timeout(60):
            await hub.flush()
        flush_s = time.monotonic() - t_flush
        sampler.sample("after flush", hub, count)
        final = hub.stats()["bench-sub"]
    sampler.sample("after close", None, count)
    return Run(floor, at, peak_feed, feed_s, flush_s, final, await subscriber_state(port))


def report(sampler: Sampler, got: Run, count: int) -> None:
    print(f"fed in {got.feed_s:.1f} s ({count / got.feed_s:,.0f} records/s); flush took {got.flush_s:.1f} s")
    print()
    header = (
        f"{'sample':<30} {'RSS MiB':>8} {'vs floor':>9} {'delivered':>9} {'dropped':>9} {'buffered':>8} "
        f"{'reports':>7} {'produced':>9} {'d+d+b-p':>7} {'check':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, rss, accounting in sampler.rows:
        print(f"{label:<30} {mib(rss):8.1f} {mib(rss - got.floor):+9.1f} {accounting}")
    print(
        "reports: platform.logsDropped records in the buffer (the hub's `buffered` counts them); "
        "check: delivered + dropped + buffered - reports == produced == fed"
    )
    print()
    first = min(c for c in got.at if c >= min(count, 100_000))
    half = min(c for c in got.at if c >= count // 2)
    growth, second = got.at[count] - got.at[first], got.at[count] - got.at[half]
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"peak RSS while feeding (sampled every {PEAK_EVERY:,} records): {mib(got.peak_feed):.1f} MiB, "
        f"floor + {mib(got.peak_feed - got.floor):.1f} MiB; lifetime peak (ru_maxrss) {mib(lifetime_peak):.1f} MiB"
    )
    final, seen = got.final, got.seen
    print(
        f"hub: delivered {final.delivered:,} + dropped {final.dropped_records:,} ({mib(final.dropped_bytes):.1f} MiB) "
        f"+ buffered {final.buffered} = {final.delivered + final.dropped_records + final.buffered:,}, "
        f"produced {final.produced:,}"
    )
    subscriber_total = seen["function"] + seen["dropped_records"]
    print(
        f"subscriber: {seen['posts']} POSTs; {seen['function']:,} function records + {seen['dropped_records']:,} "
        f"reported dropped in {seen['drop_reports']} platform.logsDropped records = {subscriber_total:,} "
        f"({'ok' if subscriber_total == count else 'MISMATCH'}: fed {count:,})"
    )
    for mismatch in sampler.mismatches:
        print(f"ACCOUNTING MISMATCH at {mismatch}")
    print(f"load average after the run: {load()}")
    print()
    verdict = "met" if mib(growth) < FLAT_MIB else "MISSED"
    print(
        f"target: memory flat while dropping: RSS growth from {first:,} to {count:,} records {mib(growth):+.2f} MiB "
        f"(flat: under {FLAT_MIB:.0f} MiB), {verdict}; from {half:,} to {count:,} records {mib(second):+.2f} MiB"
    )


async def main(count: int, delay_s: float) -> None:
    print(
        f"telemetry memory: {count:,} function records to a subscriber answering each POST after {delay_s} s; "
        f"buffering maxItems {BUFFERING.max_items}, maxBytes {BUFFERING.max_bytes}, timeoutMs "
        f"{BUFFERING.timeout_ms}; load average {load()}"
    )
    sampler = Sampler()
    subscriber, port = await start_subscriber(delay_s)
    try:
        got = await measure(sampler, port, count)
    finally:
        if subscriber.returncode is None:
            subscriber.terminate()
        async with asyncio.timeout(10):
            await subscriber.wait()
    report(sampler, got, count)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--delay-s", type=float, default=1.0)
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.records, args.delay_s)

    run_loop(bounded())


if __name__ == "__main__":
    run()
