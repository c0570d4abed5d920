"""Telemetry latency: from a function's ``print`` to an HTTP subscriber's receipt of that line, at timeoutMs 25.

What is measured: a real environment (``open_environment``, a Python handler run by awslambdaric) with one
external extension that subscribes to the Telemetry API (schema 2022-12-13, types ``function``, buffering
timeoutMs 25, maxItems and maxBytes left at Lambda's defaults) on a stdlib ``ThreadingHTTPServer`` listener.
``--invokes`` (4) invokes, ``--idle-s`` (0.25) apart; in each the handler prints ``lat <n> <time.time()>`` every
``--interval-ms`` (3) for ``--seconds`` (0.5, a little more for each next invoke, see below): about 2 s of
printing in all. For every such line it receives, the extension takes receipt time (``time.time()`` once the POST
body is read) minus printed time. At SHUTDOWN it prints p50/p99 (and a few more figures) as one JSON line, which
reaches this script through the environment's observers as an ``extension`` record.

Two views of the same deliveries:
  all records      every line. Lines are batched: a batch is due timeoutMs after its oldest record, so a line
                   printed late in a batch's window waits less; with a steady stream, the p50 is near half of
                   timeoutMs plus the delivery cost, and below timeoutMs.
  oldest in batch  the first line of each batch, the one that waits the whole timeoutMs: its latency minus
                   timeoutMs is the cost lambdabox adds (reading the pipe, the timer, the POST, the listener).

Run twice: with freeze off (``Options(freeze=False)``) and with freeze on (the default). While the handler runs
both are the same: nothing is frozen during an invoke. The difference is at the end of each invoke: with freeze
on, the environment pauses delivery and freezes the extension's listener as soon as the invoke is over, so the
lines of the last batch (printed less than timeoutMs before the end) stay buffered until the next thaw, at the next
invoke (or the shutdown) ``--idle-s`` later, as in Lambda. Those show as a tail near ``--idle-s`` in p99 and max,
and are counted as "held" (over 100 ms). It is a race: when the last batch of an invoke is due in the few ms
between the last print and the end of the invoke (the batch is then in flight, and the freeze waits for it),
nothing is held. With a steady print interval which way it goes depends on where the end of the invoke falls in
a batch's window, so invoke k prints for ``--seconds`` + k x timeoutMs / ``--invokes``: the ends fall at
different points of that window.

The floor, measured in the same run: timeoutMs (25 ms) plus a bare loopback HTTP POST round trip: the same
listener code (the extension script started with ``--floor`` outside any environment) answering POSTs of a JSON
array of ~8 function records (the typical batch here) from an aiohttp client with one keep-alive connection, as
lambdabox's sender posts; p50 of 300 after 30 untimed. The target: p50 latency within 5 ms of timeoutMs.

Run: ``.venv/bin/python bench/telemetry_latency.py`` (``--invokes``, ``--seconds``, ``--interval-ms``, ``--idle-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from common import percentile

from lambdabox.core.model import FunctionConfig, LayerConfig, Response
from lambdabox.core.telemetry import TELEMETRY, encode, render
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import TelemetryEvent
from lambdabox.loop import run as run_loop

BASE_PYTHON = getattr(sys, "_base_executable", "") or sys.executable
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
BUDGET_S = 110.0  # the whole run, so the script always ends by itself
TIMEOUT_MS = 25
TARGET_MS = 5.0
HELD_MS = 100.0  # a latency beyond this is a line held by the freezer, not one batched

HANDLER = """\
import time


def handler(event, context):
    interval, end, n = event["interval_ms"] / 1000, time.time() + event["seconds"], 0
    while time.time() < end:
        print(f"lat {n} {time.time():.6f}", flush=True)
        n += 1
        time.sleep(interval)
    return n
"""

EXTENSION = """\
#!{python}
import http.client, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TIMEOUT_MS = {timeout_ms}
lock = threading.Lock()
latencies, oldest, sizes = [], [], []


class Listener(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Lambda's (and lambdabox's) sender expects

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        received = time.time()
        got = []
        for record in json.loads(body):
            text = record.get("record")
            if record.get("type") == "function" and isinstance(text, str) and text.startswith("lat "):
                got.append(received - float(text.split()[2]))
        with lock:
            latencies.extend(got)
            if got:
                oldest.append(got[0])
            sizes.append(len(got))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def pct(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5))) - 1] * 1000


def call(conn, method, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {{}})
    answer = conn.getresponse()
    return answer, answer.read()


if sys.argv[1:] == ["--floor"]:  # the floor: the same listener, outside any environment
    print(serve(), flush=True)
    sys.stdin.read()
    sys.exit(0)

host, _, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rpartition(":")
api = http.client.HTTPConnection(host, int(port))
name = os.path.basename(sys.argv[0])
answer, _ = call(api, "POST", "/2020-01-01/extension/register", {{"events": ["INVOKE", "SHUTDOWN"]}},
                 {{"Lambda-Extension-Name": name, "Content-Type": "application/json"}})
ident = {{"Lambda-Extension-Identifier": answer.getheader("Lambda-Extension-Identifier")}}
listener = serve()
subscription = {{
    "schemaVersion": "2022-12-13",
    "types": ["function"],
    "buffering": {{"timeoutMs": TIMEOUT_MS}},
    "destination": {{"protocol": "HTTP", "URI": f"http://sandbox.localdomain:{{listener}}/"}},
}}
answer, text = call(api, "PUT", "/2022-07-01/telemetry", subscription, ident)
if answer.status != 200:
    print(f"subscription refused: {{answer.status}} {{text!r}}", flush=True)
while True:
    _, raw = call(api, "GET", "/2020-01-01/extension/event/next", headers=ident)
    if json.loads(raw)["eventType"] == "SHUTDOWN":
        with lock:
            result = {{
                "bench": "telemetry-latency",
                "records": len(latencies),
                "batches": len(sizes),
                "p50_ms": pct(latencies, 50),
                "p99_ms": pct(latencies, 99),
                "max_ms": pct(latencies, 100),
                "oldest_p50_ms": pct(oldest, 50),
                "oldest_p99_ms": pct(oldest, 99),
                "batch_p50": pct([s / 1000 for s in sizes], 50),
                "held": sum(1 for x in latencies if x * 1000 > {held_ms}),
            }}
        print(json.dumps(result), flush=True)
        sys.exit(0)
"""


def load() -> str:
    """The machine's load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_config(root: Path) -> FunctionConfig:
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "handler.py").write_text(HANDLER)
    script = root / "layer" / "extensions" / "latency-sub"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(EXTENSION.format(python=BASE_PYTHON, timeout_ms=TIMEOUT_MS, held_ms=HELD_MS))
    script.chmod(0o755)
    return FunctionConfig(
        logical_id="Bench",
        function_name="Bench",
        runtime=RUNTIME,
        handler="handler.handler",
        code=code,
        layers=(LayerConfig("latency-sub", root / "layer"),),
        timeout_s=30.0,
    )


# ---- the floor -------------------------------------------------------------------------------------------


async def measure_floor(script: Path, warmup: int, count: int) -> list[float]:
    """POST round trips (seconds) to the extension's listener code, started on its own with ``--floor``."""
    listener = await asyncio.create_subprocess_exec(
        BASE_PYTHON, str(script), "--floor", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert listener.stdout is not None and listener.stdin is not None
    try:
        async with asyncio.timeout(20):
            port = int(await listener.stdout.readline())
        t0 = time.time()
        lines = [TelemetryEvent(t0, "function", f"lat {n} {t0:.6f}") for n in range(8)]
        body = b"[" + b",".join(encode(r) for e in lines for r in render(TELEMETRY, "2022-12-13", e)) + b"]"
        headers = {"Content-Type": "application/json"}
        times: list[float] = []
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
            for i in range(warmup + count):
                t = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/", data=body, headers=headers) as answer:
                    await answer.read()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        return times
    finally:
        listener.stdin.close()
        async with asyncio.timeout(10):
            await listener.wait()


# ---- the environment -------------------------------------------------------------------------------------


async def measure(
    config: FunctionConfig, freeze: bool, invokes: int, seconds: float, interval_ms: float, idle_s: float
) -> Any:
    results: list[dict[str, Any]] = []
    other: list[str] = []

    def observe(event: TelemetryEvent) -> None:
        if event.type == "extension" and event.source == "latency-sub":
            text = str(event.record)
            if text.startswith('{"bench"'):
                results.append(json.loads(text))
            else:
                other.append(text)

    printed = 0
    async with open_environment(config, Options(freeze=freeze), [observe]) as env:
        for k in range(invokes):
            # Each invoke a little longer than the one before, so their ends fall at different points of a batch's
            # timeoutMs window (with a steady print interval, the same length would end every invoke alike).
            stretch = k * TIMEOUT_MS / 1000 / invokes
            payload = json.dumps({"seconds": seconds + stretch, "interval_ms": interval_ms}).encode()
            outcome = (await env.invoke(payload)).outcome
            if not isinstance(outcome, Response):
                raise RuntimeError(f"the invoke failed: {outcome!r}; the extension said: {other!r}")
            printed += int(outcome.body)
            await asyncio.sleep(idle_s)  # frozen (freeze on) or idle (freeze off) until the next invoke or shutdown
        degraded = env.degraded
    if len(results) != 1:
        raise RuntimeError(f"no result line from the extension; it said: {other!r}")
    return printed, results[0], degraded


# ---- main ------------------------------------------------------------------------------------------------


async def main(invokes: int, seconds: float, interval_ms: float, idle_s: float) -> None:
    print(
        f"telemetry latency: {invokes} invokes, each printing every {interval_ms} ms for {seconds} s, then "
        f"{idle_s} s idle; timeoutMs {TIMEOUT_MS}; {RUNTIME}; load average {load()}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="lambdabox-bench-") as tmp:
        config = make_config(Path(tmp))
        floor = await measure_floor(Path(tmp) / "layer" / "extensions" / "latency-sub", 30, 300)
        for freeze in (False, True):
            printed, got, degraded = await measure(config, freeze, invokes, seconds, interval_ms, idle_s)
            rows.append((freeze, printed, got))
            if degraded:
                print(f"note: degraded isolation (freeze {'on' if freeze else 'off'}): {degraded}")
    rtt_p50, rtt_p99 = percentile(floor, 50) * 1000, percentile(floor, 99) * 1000
    floor_ms = TIMEOUT_MS + rtt_p50
    print(
        f"bare loopback POST round trip (aiohttp -> the listener code, ~8 records): p50 {rtt_p50:.3f} ms, "
        f"p99 {rtt_p99:.3f} ms; floor = timeoutMs + p50 round trip = {floor_ms:.2f} ms"
    )
    print()
    header = (
        f"{'case':<12} {'view':<16} {'lines':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'floor':>6} "
        f"{'p50/floor':>9} {'p50-timeoutMs':>13}"
    )
    print(header)
    print("-" * len(header))
    for freeze, printed, got in rows:
        case = "freeze on" if freeze else "freeze off"
        if got["records"] != printed:
            print(f"{case}: the subscriber received {got['records']} of {printed} lines printed")
        for view, p50, p99, count, top in (
            ("all records", got["p50_ms"], got["p99_ms"], got["records"], got["max_ms"]),
            ("oldest in batch", got["oldest_p50_ms"], got["oldest_p99_ms"], got["batches"], None),
        ):
            top_text = f"{top:8.1f}" if top is not None else f"{'':8}"
            print(
                f"{case:<12} {view:<16} {count:>6} {p50:7.2f} {p99:7.2f} {top_text} {floor_ms:6.2f} "
                f"{p50 / floor_ms:9.2f} {p50 - TIMEOUT_MS:+13.2f}"
            )
    print()
    for freeze, _, got in rows:
        print(
            f"freeze {'on ' if freeze else 'off'}: {got['batches']} batches, p50 {got['batch_p50']:.0f} lines each; "
            f"{got['held']} lines took over {HELD_MS:.0f} ms (held by the freezer from an invoke's end to the thaw)"
        )
    print(f"load average after the run: {load()}")
    print()
    off = rows[0][2]
    for view, key in (("all records", "p50_ms"), ("oldest in batch", "oldest_p50_ms")):
        p50 = off[key]
        verdict = "met" if p50 - TIMEOUT_MS <= TARGET_MS else "MISSED"
        print(
            f"target: p50 within {TARGET_MS:.0f} ms of timeoutMs ({view}, freeze off): p50 {p50:.2f} ms, "
            f"p50 - timeoutMs {p50 - TIMEOUT_MS:+.2f} ms, {verdict}"
        )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--invokes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--interval-ms", type=float, default=3.0)
    parser.add_argument("--idle-s", type=float, default=0.25)
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.invokes, args.seconds, args.interval_ms, args.idle_s)

    run_loop(bounded())


if __name__ == "__main__":
    run()
