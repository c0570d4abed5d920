"""Warm invoke latency through ``Environment.invoke``, beside a bare loopback HTTP round trip.

What is timed: ``await env.invoke(b"{}")`` on a warm environment (after the warm-up invokes), for a no-op
Python handler (``def handler(e, c): return None``), from the caller's side:

  (a) no extension;
  (b) one external Python extension registered for INVOKE, looping on /event/next with an http.client
      keep-alive connection.

Each is run with freeze on (the default: the cgroup freezer freezes the environment after every invoke and
thaws it before the next one) and with freeze off, so the freezer's share is visible. Freeze and thaw are
also timed on their own (by wrapping the environment's isolation methods in this script). The time to the
answer (``on_outcome``: when Lambda would answer its caller) is given too; ``invoke()`` itself returns
later, when the invoke phase is over (the runtime asked for the next event, and so did the extension).

The floor, measured in the same run: a bare loopback HTTP round trip. The HTTP server lambdabox serves its APIs
with (``lambdabox.api.httpserver``), in this process's event loop, answers ``GET /ping`` with a 2-byte body; a
client in a separate process (the base interpreter the runtime uses) does blocking ``http.client`` keep-alive
GETs and times each one. So the floor holds: one request and one response over a loopback TCP connection
already open, the server's request parsing and routing and response writing, two cross-process wake-ups
(server wakes on the request, client wakes on the response) and http.client's parsing. It holds none of
lambdabox's lifecycle code.

An invoke needs at least two such round trips in sequence (the runtime's pending GET /next is answered
with the event; it POSTs the response and gets a 202; then it GETs /next again, which is what ends the
invoke phase), so a ratio near 2 is the best this design can do.

The machine may be shared: the four environments and the floor are all opened first, then measured in
interleaved blocks (``--block`` invokes each, the order rotating every round), so that load from elsewhere
falls on every case alike rather than on whichever ran at the wrong moment.

Run: ``.venv/bin/python bench/warm_invoke.py`` (``--invokes``/``--warmup``/``--block`` to change the counts).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import LOOPS, LogTail, ms, percentile, run_on

from lambdabox.api.httpserver import Request, Response, Router, open_http_server
from lambdabox.core.model import FunctionConfig, LayerConfig
from lambdabox.core.model import Response as InvokeResponse
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.runner import Environment

BASE_PYTHON = getattr(sys, "_base_executable", "") or sys.executable
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
BUDGET_S = 110.0  # the whole run, so the script always ends by itself
TARGET_S = 0.001  # warm invoke p50 under 1 ms (no extension, freeze on)

HANDLER = "def handler(e, c):\n    return None\n"

EXTENSION = """\
#!{python}
import http.client, json, os, sys

host, _, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rpartition(":")
conn = http.client.HTTPConnection(host, int(port))
conn.request(
    "POST",
    "/2020-01-01/extension/register",
    body=json.dumps({{"events": ["INVOKE"]}}),
    headers={{"Lambda-Extension-Name": os.path.basename(sys.argv[0]), "Content-Type": "application/json"}},
)
resp = conn.getresponse()
resp.read()
headers = {{"Lambda-Extension-Identifier": resp.getheader("Lambda-Extension-Identifier")}}
while True:
    conn.request("GET", "/2020-01-01/extension/event/next", headers=headers)
    conn.getresponse().read()
"""

# Reads a count per line on stdin, does that many GETs, writes their times as one JSON line; ends at EOF.
FLOOR_CLIENT = """\
import http.client, json, sys, time

conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        conn.request("GET", "/ping")
        conn.getresponse().read()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)
"""


def describe(samples: list[float]) -> str:
    slow = sum(1 for t in samples if t > 0.001)
    return f"{ms(percentile(samples, 50)):.3f} / {ms(percentile(samples, 99)):.3f} ({len(samples)}; {slow} > 1 ms)"


def load() -> str:
    """The machine's load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Case:
    """One line of the table: its samples, and how to run a block of ``n`` more."""

    name: str
    run: Callable[[Case, int], Awaitable[None]]
    times: list[float] = field(default_factory=list)  # invoke() returned (or: floor round trip)
    answers: list[float] = field(default_factory=list)  # the outcome was known
    busy: float = 0.0  # wall time of this case's measured blocks
    freezes: list[float] = field(default_factory=list)
    thaws: list[float] = field(default_factory=list)
    degraded: tuple[str, ...] = ()
    done: bool = False  # measuring is over (the thaw before shutdown is not counted)

    def reset(self) -> None:
        self.times, self.answers, self.busy, self.freezes, self.thaws = [], [], 0.0, [], []


# ---- the floor -------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def floor_case() -> collections.abc.AsyncIterator[Case]:
    async def ping(_request: Request) -> Response:
        return Response(200, b"{}")

    router = Router()
    router.add("GET", "/ping", ping)
    async with open_http_server(router) as server:
        host, port = await server.listen("127.0.0.1", 0)
        client = await asyncio.create_subprocess_exec(
            *(BASE_PYTHON, "-I", "-c", FLOOR_CLIENT, host, str(port)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdin is not None and client.stdout is not None
        stdin, stdout = client.stdin, client.stdout

        async def run(case: Case, n: int) -> None:
            t0 = time.perf_counter()
            stdin.write(f"{n}\n".encode())
            await stdin.drain()
            line = await stdout.readline()
            if not line:
                raise RuntimeError(f"floor client exited {await client.wait()}")
            case.busy += time.perf_counter() - t0
            case.times += json.loads(line)

        try:
            yield Case("floor: loopback HTTP round trip", run)
        finally:
            stdin.close()
            await asyncio.wait_for(client.wait(), 5.0)


# ---- the function ----------------------------------------------------------------------------------------


def make_config(root: Path, with_extension: bool) -> FunctionConfig:
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "handler.py").write_text(HANDLER)
    layers: tuple[LayerConfig, ...] = ()
    if with_extension:
        layer = root / "layer"
        (layer / "extensions").mkdir(parents=True, exist_ok=True)
        script = layer / "extensions" / "bench-ext"
        script.write_text(EXTENSION.format(python=BASE_PYTHON))
        script.chmod(0o755)
        layers = (LayerConfig("bench-ext", layer),)
    return FunctionConfig(
        logical_id="Bench",
        function_name="Bench",
        runtime=RUNTIME,
        handler="handler.handler",
        code=code,
        layers=layers,
        timeout_s=10.0,
    )


async def check(env: Environment, tail: LogTail) -> float:
    """One invoke; returns when the outcome was known (``on_outcome``: when Lambda would answer the caller)."""
    answered: list[float] = []
    result = await env.invoke(b"{}", on_outcome=lambda _outcome: answered.append(time.perf_counter()))
    if not isinstance(result.outcome, InvokeResponse) or result.outcome.body != b"null":
        raise tail.failure(result.outcome)
    return answered[0]


def timed(method: Callable[[], None], into: Callable[[], list[float] | None]) -> Callable[[], None]:
    def wrapper() -> None:
        t0 = time.perf_counter()
        method()
        samples = into()
        if samples is not None:
            samples.append(time.perf_counter() - t0)

    return wrapper


async def env_case(stack: contextlib.AsyncExitStack, name: str, config: FunctionConfig, freeze: bool) -> Case:
    tail = LogTail()
    env = await stack.enter_async_context(open_environment(config, Options(freeze=freeze), [tail]))

    async def run(case: Case, n: int) -> None:
        t_block = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            answered = await check(env, tail)
            case.times.append(time.perf_counter() - t0)
            case.answers.append(answered - t0)
        case.busy += time.perf_counter() - t_block

    case = Case(name, run, degraded=tuple(env.degraded))
    # Time the freezer calls themselves (wrapping the environment's isolation's methods). Calls during the warm-up
    # land in lists reset() drops.
    isolation = env.isolation
    isolation.freeze_at_once = timed(isolation.freeze_at_once, lambda: None if case.done else case.freezes)  # type: ignore[method-assign]
    isolation.thaw = timed(isolation.thaw, lambda: None if case.done else case.thaws)  # type: ignore[method-assign]
    return case


# ---- main ------------------------------------------------------------------------------------------------


async def main(warmup: int, count: int, block: int) -> None:
    print(f"warm invoke: {count} invokes after {warmup} warm-up ones, in blocks of {block}; {RUNTIME}")
    print(f"load average before: {load()}")
    with tempfile.TemporaryDirectory(prefix="lambdabox-bench-") as tmp:
        plain, ext = make_config(Path(tmp) / "plain", False), make_config(Path(tmp) / "ext", True)
        async with contextlib.AsyncExitStack() as stack:
            floor = await stack.enter_async_context(floor_case())
            cases = [
                await env_case(stack, "no extension, freeze on", plain, True),
                await env_case(stack, "no extension, freeze off", plain, False),
                await env_case(stack, "one INVOKE extension, freeze on", ext, True),
                await env_case(stack, "one INVOKE extension, freeze off", ext, False),
            ]
            everything = [floor, *cases]
            for case in everything:
                await case.run(case, warmup)
                case.reset()
            rounds = max(1, count // block)
            for r in range(rounds):
                for case in everything[r % len(everything) :] + everything[: r % len(everything)]:
                    await case.run(case, block)
            for case in everything:
                case.done = True
    for case in cases:
        if case.degraded:
            print(f"note: degraded isolation for {case.name}: {case.degraded}")
    report(floor, cases)


def report(floor: Case, cases: list[Case]) -> None:
    floor_p50 = percentile(floor.times, 50)
    print()
    # mean = wall time of a case's blocks / its invokes: it also holds a freeze that ends after invoke() returned.
    # answer p50 = time to the outcome (on_outcome), what a caller of Lambda would wait for; the others are
    # for invoke() returning, once the invoke phase is over (runtime and extensions done).
    header = (
        f"{'case':<34} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'floor p50':>10} {'ratio p50':>10} "
        f"{'answer p50':>11}"
    )
    print(header)
    print("-" * len(header))
    for case in [floor, *cases]:
        p50, p99 = percentile(case.times, 50), percentile(case.times, 99)
        mean = case.busy / len(case.times) if case is not floor else sum(case.times) / len(case.times)
        answer = f"{ms(percentile(case.answers, 50)):11.3f}" if case.answers else ""
        print(
            f"{case.name:<34} {ms(p50):8.3f} {ms(p99):8.3f} {ms(mean):8.3f} {ms(floor_p50):10.3f} "
            f"{p50 / floor_p50:10.2f} {answer}"
        )
    print()
    print("freezer calls during the measured invokes: p50 / p99 ms (count; how many took over 1 ms):")
    for case in cases:
        if case.freezes and case.thaws:
            print(f"  {case.name:<32} freeze {describe(case.freezes)}, thaw {describe(case.thaws)}")
    print()
    by_name = {case.name: case for case in cases}
    for name in ("no extension", "one INVOKE extension"):
        on, off = by_name[f"{name}, freeze on"], by_name[f"{name}, freeze off"]
        p50_cost = percentile(on.times, 50) - percentile(off.times, 50)
        answer_cost = percentile(on.answers, 50) - percentile(off.answers, 50)
        mean_cost = on.busy / len(on.times) - off.busy / len(off.times)
        print(
            f"freezer cost, {name}: p50 {ms(p50_cost):+.3f} ms, answer p50 {ms(answer_cost):+.3f} ms, "
            f"mean {ms(mean_cost):+.3f} ms per invoke (freeze on minus freeze off)"
        )
    print()
    p50 = percentile(by_name["no extension, freeze on"].times, 50)
    verdict = "met" if p50 < TARGET_S else "MISSED"
    print(f"target: warm invoke p50 under {ms(TARGET_S):.0f} ms (no extension, freeze on): {ms(p50):.3f} ms, {verdict}")
    print(f"load average after: {load()}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--invokes", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="the event loop (lambdabox runs on uvloop)")
    args = parser.parse_args()

    async def bounded() -> None:
        async with asyncio.timeout(BUDGET_S):
            await main(args.warmup, args.invokes, args.block)

    run_on(args.loop, bounded())


if __name__ == "__main__":
    run()
