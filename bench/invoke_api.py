"""Invoke API throughput and latency: invokes per second, p50 and p99 at concurrency 1, 2 and 8, beside lambdabox's
own HTTP server alone, driven the same way.

What is measured: ``POST /2015-03-31/functions/Noop/invocations`` with a ``{}`` body, answered 200 with ``null``
by a no-op Python handler (``def handler(e, c): return None``), through ``open_server`` (default settings: isolation
and freeze on, a pool per function) in a process of its own. The load generator is a third process with N worker
processes (one per connection, so that no two connections share a GIL), each with its own ``http.client``
keep-alive connection, each sending its next request as soon as it has read the answer to the previous one (a
closed loop: concurrency N). Latency is per request, from ``request()`` to the body read; throughput is the
requests answered in a block divided by the block's wall time (from the common start to the last one's end).
Blocks are time-bounded (``--block-s``), so every case gets the same share of the wall clock.

The floor, measured in the same run: the HTTP server lambdabox serves every API with (``lambdabox.api.httpserver``
on ``lambdabox.loop``), alone, in a process of its own (the same venv interpreter), with the same route, answering
200 with the same ``null`` JSON body; driven by the same load generator, over its own connections, at the same
concurrencies. It holds no environment, pool or lifecycle code and no runtime: what is left is the HTTP server,
loopback TCP, the wake-ups and the load generator itself. A lambdabox invoke holds that exchange
and two more between lambdabox and the runtime (the event, as the answer to the runtime's pending ``GET /next``;
the runtime's ``POST .../response``, answered 202; then its next ``GET /next`` ends the invoke phase). So its
latency cannot be under about twice the floor's (four one-way loopback hops and wake-ups instead of two, plus the
runtime's own work), and lambdabox's server handles three HTTP requests and three responses per invoke where the
floor handles one of each.

Also given, for information, from one thread:

- boto3 ``invoke()`` against lambdabox and against the floor server (boto3 builds, signs and parses every call in
  Python: about 1 ms of the client's own CPU per call, which the floor row shows);
- "paced" rows: http.client as above, but the thread spends 0.5 ms of CPU (a busy loop, as an SDK's own work
  would) before each request, not counted in the latency. With 2 cores this changes what lambdabox waits on (the
  cgroup freezer only completes once the runtime gets a core), which the back-to-back rows do not show.

And the CPU time per request of each process (psutil, over the measured blocks): lambdabox's server process, its
runtimes, the floor server and the load generator; how busy the server process was (it is
one Python thread: at 100 % it is the bound); and how many of the machine's cores were busy (all processes, from
``/proc/stat``), which tells when a case is bounded by CPU rather than by waiting, and how much other work ran.

The machine may be shared (and has 2 cores): every case (lambdabox and floor at each concurrency, the boto3 and
the paced rows) is run in blocks, all the cases once per round, the order rotating every round, so that load from
elsewhere falls on every case alike. Before the rounds each case gets a warm-up block (which also starts the warm
environments concurrency 8 needs); the number of environments the pool holds is printed after the warm-up and at
the end (an invoke that finds none idle starts one, as in Lambda; an environment is busy until its runtime asks
for the next event, after the caller has its answer, so the pool may hold more environments than the concurrency).

Targets (issue 4): a warm invoke through the API at p50 under 1 ms (concurrency 1); throughput at concurrency 2
at least 1.5 times concurrency 1.

Run: ``.venv/bin/python bench/invoke_api.py`` (``--rounds``/``--block-s``/``--warmup-s`` to change them; about 55 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import ms, percentile

PYTHON = sys.executable  # the venv's interpreter: lambdabox, aiohttp, boto3
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
FUNCTION = "Noop"
PATH = f"/2015-03-31/functions/{FUNCTION}/invocations"
BUDGET_S = 110.0  # the whole run, so the script always ends by itself
STOP_S = 20.0  # a server's own shutdown (every environment shut down as Lambda does)
CONCURRENCIES = (1, 2, 8)
TARGET_P50_S = 0.001
TARGET_SCALING = 1.5
PAUSE_S = 0.0005  # the paced rows: the client's own work between two requests, about what boto3 spends
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDLAMBDABOXBENCH",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}

NOOP_HANDLER = "def handler(e, c):\n    return None\n"

TEMPLATE = """\
Transform: AWS::Serverless-2016-10-31
Resources:
  {name}:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: {runtime}
      Handler: handler.handler
      CodeUri: code/
      Timeout: 10
"""

# The lambdabox server: open_server on a free loopback port. Prints {"url", "pid"} once serving; then, for each line
# "stats" on stdin, one JSON line with each pool's counts and the problems reported; EOF or SIGTERM: stop as
# `start-lambda` does (invokes in flight finish, every environment is shut down).
SERVER = """\
import asyncio, json, os, signal, sys
from pathlib import Path
from lambdabox.service.server import ServerSettings, open_server
from lambdabox.template.load import load_template

async def main(template, destinations, max_concurrency):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    reports = []
    settings = ServerSettings(destinations=Path(destinations))
    if max_concurrency:
        settings = ServerSettings(destinations=Path(destinations), max_concurrency=int(max_concurrency))
    async with open_server(load_template(Path(template)), "127.0.0.1", 0, settings, report=reports.append) as server:
        print(json.dumps({"url": server.url, "pid": os.getpid()}), flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        while True:
            line = asyncio.ensure_future(reader.readline())
            await asyncio.wait({line, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done() or not line.result():
                line.cancel()
                break
            pools = {
                name: {"environments": pool.environments, "idle": pool.idle, "busy": pool.busy}
                for name, pool in server.pools.items()
            }
            print(json.dumps({"pools": pools, "reports": reports}), flush=True)

if os.environ.get("BENCH_LOOP") == "asyncio":  # (--loop asyncio: compare lambdabox on asyncio's own loop)
    run = asyncio.run
else:
    from lambdabox.loop import run
run(main(*sys.argv[1:]))
"""

# The floor: lambdabox's own HTTP server alone (lambdabox.api.httpserver, on lambdabox's event loop), same route,
# answering 200 with the same JSON body. Prints {"url", "pid"} once serving; stops at EOF on stdin or SIGTERM.
FLOOR = """\
import asyncio, json, os, signal, sys
from lambdabox.api.httpserver import Response, Router, open_http_server
if os.environ.get("BENCH_LOOP") == "asyncio":  # (--loop asyncio: compare lambdabox on asyncio's own loop)
    run = asyncio.run
else:
    from lambdabox.loop import run

async def invoke(request):
    return Response(200, b"null")

async def main():
    router = Router()
    router.add("POST", "/2015-03-31/functions/{name}/invocations", invoke)
    async with open_http_server(router) as server:
        host, port = await server.listen("127.0.0.1", 0)
        print(json.dumps({"url": f"http://{host}:{port}", "pid": os.getpid()}), flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopping, asyncio.ensure_future(reader.read())}, return_when=asyncio.FIRST_COMPLETED)

run(main())
"""

# The load generator. Arguments: path, then name=url for each target. Reads one JSON command per line on stdin:
# {"target", "client": "http"|"boto3", "c", "seconds", "pause"}; runs the block; writes one JSON line: {"times" (one
# latency per request, s), "wall" (s), "errors", "error"}. Each target keeps its http.client connections (one per
# thread index) and its boto3 client across blocks. Ends at EOF.
LOADGEN = """\
import http.client, json, multiprocessing, sys, time
from urllib.parse import urlsplit

PATH = sys.argv[1]
TARGETS = dict(arg.split("=", 1) for arg in sys.argv[2:])
HEADERS = {"Content-Type": "application/json"}
conns = {name: [] for name in TARGETS}
boto = {}

def connection(target, i):
    pool = conns[target]
    while len(pool) <= i:
        url = urlsplit(TARGETS[target])
        pool.append(http.client.HTTPConnection(url.hostname, url.port, timeout=30))
    return pool[i]

# One connection in a process of its own (no GIL shared with the other connections): runs each block asked for on
# the pipe, from its start time to its deadline, and answers with what it measured.
def http_worker(target, i, pipe):
    conn = connection(target, i)
    perf = time.perf_counter
    while (block := pipe.recv()) is not None:
        start, seconds, pause = block
        while perf() < start:  # every worker starts the block at the same moment
            pass
        deadline = start + seconds
        times, errors, error = [], 0, ""
        while True:
            if pause:  # the client's own work between two requests (not timed)
                until = perf() + pause
                while perf() < until:
                    pass
            t0 = perf()
            if t0 >= deadline:
                break
            try:
                conn.request("POST", PATH, body=b"{}", headers=HEADERS)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and body == b"null"
                if not ok:
                    errors, error = errors + 1, f"{response.status} {body[:200]!r}"
            except Exception as exc:
                errors, error = errors + 1, repr(exc)
                conn.close()
            times.append(perf() - t0)
        pipe.send((times, errors, error, perf()))

workers = {}

def worker(target, i):
    if (target, i) not in workers:
        mine, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(target=http_worker, args=(target, i, theirs), daemon=True)
        process.start()
        workers[target, i] = (process, mine)
    return workers[target, i][1]

def run_http(target, c, seconds, pause):
    pipes = [worker(target, i) for i in range(c)]
    t_start = time.perf_counter() + 0.005  # (CLOCK_MONOTONIC: the same clock in every process)
    for pipe in pipes:
        pipe.send((t_start, seconds, pause))
    out = [pipe.recv() for pipe in pipes]
    times = [t for o in out for t in o[0]]
    errors = sum(o[1] for o in out)
    error = next((o[2] for o in out if o[2]), "")
    return {"times": times, "wall": max(o[3] for o in out) - t_start, "errors": errors, "error": error}

def run_boto3(target, seconds):
    if target not in boto:
        import boto3
        from botocore.config import Config
        config = Config(retries={"total_max_attempts": 1}, read_timeout=30, connect_timeout=5)
        boto[target] = boto3.client("lambda", endpoint_url=TARGETS[target], config=config)
    client = boto[target]
    times, errors, error = [], 0, ""
    perf = time.perf_counter
    t_start = perf()
    deadline = t_start + seconds
    while True:
        t0 = perf()
        if t0 >= deadline:
            break
        try:
            answer = client.invoke(FunctionName=PATH.split("/")[3], Payload=b"{}")
            body = answer["Payload"].read()
            if answer["StatusCode"] != 200 or body != b"null" or "FunctionError" in answer:
                errors, error = errors + 1, f"{answer['StatusCode']} {body[:200]!r}"
        except Exception as exc:
            errors, error = errors + 1, repr(exc)
        times.append(perf() - t0)
    return {"times": times, "wall": perf() - t_start, "errors": errors, "error": error}

def stop_workers():
    for process, pipe in workers.values():
        pipe.send(None)
        process.join(5)

for line in sys.stdin:
    command = json.loads(line)
    if command["client"] == "boto3":
        result = run_boto3(command["target"], command["seconds"])
    else:
        result = run_http(command["target"], command["c"], command["seconds"], command.get("pause", 0.0))
    result["times"] = [round(t, 7) for t in result["times"]]
    print(json.dumps(result), flush=True)
stop_workers()
"""


def load() -> str:
    """The machine's load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_template(root: Path, handler: str = NOOP_HANDLER) -> Path:
    """A SAM template with one Python function, ``Noop``, whose code is ``handler``."""
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "handler.py").write_text(handler)
    template = root / "template.yaml"
    template.write_text(TEMPLATE.format(name=FUNCTION, runtime=RUNTIME))
    return template


# ---- child processes -------------------------------------------------------------------------------------


class Budget(Exception):
    """The run took longer than its budget."""


def _over_budget(_signum: int, _frame: object) -> None:
    raise Budget(f"over the budget of {BUDGET_S:.0f} s")


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise Budget in the main thread after ``seconds``, so that every ``finally`` (stopping children) runs."""
    previous = signal.signal(signal.SIGALRM, _over_budget)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Child:
    """A process started by this script, talked to by JSON lines on its stdin and stdout."""

    process: subprocess.Popen[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: dict[str, Any] | str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((command if isinstance(command, str) else json.dumps(command)) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"process {self.pid} ended (status {self.process.wait()})")
        return dict(json.loads(line))

    def ask(self, command: dict[str, Any] | str) -> dict[str, Any]:
        self.send(command)
        return self.receive()


@contextlib.contextmanager
def child(argv: list[str], *, greet: bool = True, env: dict[str, str] | None = None) -> Iterator[Child]:
    """Start a process; with ``greet``, wait for its first line ({"url", "pid"}). On exit: close its stdin, SIGTERM
    it, wait (bounded), then SIGKILL it and whatever it started that is still there, each by its pid."""
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    handle = Child(process)
    try:
        if greet:
            handle.info = handle.receive()
        yield handle
    finally:
        stop(process)


def stop(process: subprocess.Popen[str]) -> None:
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()  # EOF: each child stops by itself (the server shuts its environments down)
    try:
        process.wait(STOP_S / 2)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_S / 2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for proc in descendants:  # normally gone: the server shut its environments down
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                print(f"note: killing a leftover process {proc.pid} ({proc.name()})", file=sys.stderr)
                proc.kill()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def lambdabox_server(template: Path, tmp: Path, max_concurrency: int | None = None) -> Iterator[Child]:
    argv = [PYTHON, "-c", SERVER, str(template), str(tmp / "destinations.jsonl"), str(max_concurrency or "")]
    with child(argv) as server:
        yield server


# ---- measuring -------------------------------------------------------------------------------------------


def cpu_s(pids: list[int]) -> float:
    """User + system CPU time of these processes (those gone count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def descendants(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


@dataclass
class Case:
    """One line of the tables: which server, which client, which concurrency, and what the blocks gave."""

    target: str  # "lambdabox" or "floor"
    client: str  # "http" or "boto3"
    c: int
    pause: float = 0.0  # the client's own work between two requests on a connection (s)
    times: list[float] = field(default_factory=list)
    wall: float = 0.0
    server_cpu: float = 0.0  # the server process under test
    runtimes_cpu: float = 0.0  # its descendants (lambdabox: the runtimes)
    loadgen_cpu: float = 0.0
    machine_cpu: float = 0.0
    errors: int = 0
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.target}, {self.client}, c={self.c}" + (f", paced {ms(self.pause):g} ms" if self.pause else "")

    @property
    def rate(self) -> float:
        return len(self.times) / self.wall

    def per_request_ms(self, cpu: float) -> float:
        return ms(cpu / len(self.times))


class Bench:
    def __init__(self, loadgen: Child, servers: dict[str, Child]) -> None:
        self.loadgen = loadgen
        self.servers = servers

    def run(self, case: Case, seconds: float, counted: bool = True) -> None:
        server = self.servers[case.target]
        server_pid = int(server.info["pid"])
        below = descendants(server_pid)
        clients = [self.loadgen.pid, *descendants(self.loadgen.pid)]  # the load generator and its workers
        before = (cpu_s([server_pid]), cpu_s(below), cpu_s(clients), machine_busy_s())
        command = {"target": case.target, "client": case.client, "c": case.c, "seconds": seconds, "pause": case.pause}
        got = self.loadgen.ask(command)
        clients = [self.loadgen.pid, *descendants(self.loadgen.pid)]  # (workers started for this block too)
        after = (cpu_s([server_pid]), cpu_s(below), cpu_s(clients), machine_busy_s())
        if got["errors"]:
            case.errors += got["errors"]
            case.error = case.error or got["error"]
        if not counted:
            return
        case.times += got["times"]
        case.wall += got["wall"]
        case.server_cpu += after[0] - before[0]
        case.runtimes_cpu += after[1] - before[1]
        case.loadgen_cpu += after[2] - before[2]
        case.machine_cpu += after[3] - before[3]


def pool_stats(server: Child) -> dict[str, Any]:
    return server.ask("stats")


def describe_pool(stats: dict[str, Any]) -> str:
    pool = stats["pools"][FUNCTION]
    return f"{pool['environments']} environments ({pool['idle']} idle)"


def main(rounds: int, block_s: float, warmup_s: float) -> None:
    print(
        f"Invoke API: concurrency {', '.join(map(str, CONCURRENCIES))}; {rounds} rounds of {block_s} s blocks per "
        f"case, after a {warmup_s} s warm-up block each; {RUNTIME}; {os.cpu_count()} cores"
    )
    print(f"load average before: {load()}")
    with tempfile.TemporaryDirectory(prefix="lambdabox-bench-") as tmp_name:
        tmp = Path(tmp_name)
        template = write_template(tmp)
        with (
            lambdabox_server(template, tmp) as lbx,
            child([PYTHON, "-c", FLOOR]) as floor,
            child(
                [PYTHON, "-c", LOADGEN, PATH, f"lambdabox={lbx.info['url']}", f"floor={floor.info['url']}"],
                greet=False,
                env={**os.environ, **CREDENTIALS},
            ) as loadgen,
        ):
            print(f"processes: lambdabox server {lbx.pid}, floor server {floor.pid}, load generator {loadgen.pid}")
            bench = Bench(loadgen, {"lambdabox": lbx, "floor": floor})
            cases = [Case(target, "http", c) for c in CONCURRENCIES for target in ("lambdabox", "floor")]
            cases += [Case("lambdabox", "boto3", 1), Case("floor", "boto3", 1)]
            cases += [Case("lambdabox", "http", 1, PAUSE_S), Case("floor", "http", 1, PAUSE_S)]
            for case in cases:
                bench.run(case, warmup_s, counted=False)
            warm = pool_stats(lbx)
            for r in range(rounds):
                for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                    bench.run(case, block_s)
            end = pool_stats(lbx)
    report(cases, warm, end)


def report(cases: list[Case], warm: dict[str, Any], end: dict[str, Any]) -> None:
    by = {(case.target, case.client, case.c, case.pause): case for case in cases}
    for line in sorted(set(end["reports"])):
        print(f"note: lambdabox said: {line}")
    print(f"pool after the warm-up: {describe_pool(warm)}; at the end: {describe_pool(end)}")
    for case in cases:
        if case.errors:
            print(f"ERRORS: {case.name}: {case.errors} failed requests, e.g. {case.error}")
    print()
    main_table(by)
    print()
    cpu_table(cases)
    print()
    informative(by)
    print()
    verdicts(by)
    print(f"load average after: {load()}")


Cases = dict[tuple[str, str, int, float], Case]


def main_table(by: Cases) -> None:
    header = (
        f"{'conc':>4} | {'invokes/s':>9} {'floor/s':>8} {'ratio':>6} | {'p50 ms':>7} {'floor':>6} {'ratio':>6} | "
        f"{'p99 ms':>7} {'floor':>6} {'ratio':>6} | {'requests':>8}"
    )
    print("lambdabox (no-op Python function) against the floor (its HTTP server alone), http.client connections:")
    print(header)
    print("-" * len(header))
    for c in CONCURRENCIES:
        lbx, flr = by["lambdabox", "http", c, 0.0], by["floor", "http", c, 0.0]
        p50, fp50 = percentile(lbx.times, 50), percentile(flr.times, 50)
        p99, fp99 = percentile(lbx.times, 99), percentile(flr.times, 99)
        print(
            f"{c:>4} | {lbx.rate:9.0f} {flr.rate:8.0f} {lbx.rate / flr.rate:6.2f} | {ms(p50):7.3f} {ms(fp50):6.3f} "
            f"{p50 / fp50:6.2f} | {ms(p99):7.3f} {ms(fp99):6.3f} {p99 / fp99:6.2f} | {len(lbx.times):8}"
        )


def cpu_table(cases: list[Case]) -> None:
    print("CPU per request, ms (psutil, over the measured blocks); cores busy (the server alone, the three processes,")
    print("the whole machine from /proc/stat: the difference is other work on the machine):")
    header = (
        f"{'case':<34} {'server':>7} {'runtimes':>8} {'loadgen':>7} | {'wall/req':>8} | "
        f"{'server busy':>11} {'ours busy':>9} {'machine busy':>12}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        per = case.per_request_ms
        ours = case.server_cpu + case.runtimes_cpu + case.loadgen_cpu
        print(
            f"{case.name:<34} {per(case.server_cpu):7.3f} {per(case.runtimes_cpu):8.3f} {per(case.loadgen_cpu):7.3f} | "
            f"{ms(case.wall / len(case.times)):8.3f} | {case.server_cpu / case.wall:11.2f} {ours / case.wall:9.2f} "
            f"{case.machine_cpu / case.wall:12.2f}"
        )


def informative(by: Cases) -> None:
    print("one thread, informative (boto3's own cost; a client that works between requests):")
    extra = [
        by["lambdabox", "boto3", 1, 0.0],
        by["floor", "boto3", 1, 0.0],
        by["lambdabox", "http", 1, PAUSE_S],
        by["floor", "http", 1, PAUSE_S],
    ]
    for case in extra:
        p50, p99 = percentile(case.times, 50), percentile(case.times, 99)
        print(f"  {case.name:<36} p50 {ms(p50):6.3f} ms, p99 {ms(p99):6.3f} ms, {case.rate:5.0f}/s ({len(case.times)})")

    def p50_ms(target: str, client: str, pause: float) -> float:
        return ms(percentile(by[target, client, 1, pause].times, 50))

    print(
        f"  boto3 over http.client, p50: floor {p50_ms('floor', 'boto3', 0) - p50_ms('floor', 'http', 0):+.3f} ms "
        f"(the SDK's own cost), lambdabox {p50_ms('lambdabox', 'boto3', 0) - p50_ms('lambdabox', 'http', 0):+.3f} ms"
    )
    print(
        f"  paced over back-to-back, p50: floor {p50_ms('floor', 'http', PAUSE_S) - p50_ms('floor', 'http', 0):+.3f} "
        f"ms, lambdabox {p50_ms('lambdabox', 'http', PAUSE_S) - p50_ms('lambdabox', 'http', 0):+.3f} ms"
    )


def verdicts(by: Cases) -> None:
    rate = {c: by["lambdabox", "http", c, 0.0].rate for c in CONCURRENCIES}
    floor_rate = {c: by["floor", "http", c, 0.0].rate for c in CONCURRENCIES}
    scaling = rate[2] / rate[1]
    print(f"throughput(c=2) / throughput(c=1): lambdabox {scaling:.2f}, floor {floor_rate[2] / floor_rate[1]:.2f}")
    print(
        f"throughput(c=8) / throughput(c=2): lambdabox {rate[8] / rate[2]:.2f}, "
        f"floor {floor_rate[8] / floor_rate[2]:.2f}"
    )
    cores = os.cpu_count() or 1
    for c in CONCURRENCIES:
        case = by["lambdabox", "http", c, 0.0]
        server_busy = case.server_cpu / case.wall
        if server_busy > 0.8:
            print(
                f"note: at concurrency {c} lambdabox's server process (one Python thread) was busy {server_busy:.0%} "
                f"of the time, at {case.per_request_ms(case.server_cpu):.3f} ms of CPU per invoke: its throughput "
                f"is bounded by its own CPU ({1000 / case.per_request_ms(case.server_cpu):.0f} invokes/s at most)"
            )
    for c in CONCURRENCIES:
        for target in ("lambdabox", "floor"):
            case = by[target, "http", c, 0.0]
            machine_busy = case.machine_cpu / case.wall
            ours = (case.server_cpu + case.runtimes_cpu + case.loadgen_cpu) / case.wall
            if ours > 0.8 * cores:
                print(
                    f"note: {target} at concurrency {c}: the server, its runtimes and the load generator kept "
                    f"{ours:.2f} of the {cores} cores busy: the figures there are bounded by the machine's CPU"
                )
            elif machine_busy > 0.85 * cores:
                print(
                    f"note: {target} at concurrency {c}: the machine's {cores} cores were {machine_busy / cores:.0%} "
                    f"busy, {machine_busy - ours:.2f} cores of it with other work: the figures there are bounded by "
                    f"CPU shared with whatever else ran on the machine"
                )
    print()
    p50 = percentile(by["lambdabox", "http", 1, 0.0].times, 50)
    verdict = "met" if p50 < TARGET_P50_S else "MISSED"
    print(
        f"target: warm invoke through the API, p50 under {ms(TARGET_P50_S):.0f} ms (c=1): {ms(p50):.3f} ms, {verdict}"
    )
    verdict = "met" if scaling >= TARGET_SCALING else "MISSED"
    print(f"target: throughput at c=2 at least {TARGET_SCALING} x c=1: {scaling:.2f} x, {verdict}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--block-s", type=float, default=0.25)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the servers' event loop (lambdabox runs on uvloop)")  # fmt: skip
    args = parser.parse_args()
    os.environ["BENCH_LOOP"] = args.loop  # read by the server processes
    with budget(BUDGET_S):
        main(args.rounds, args.block_s, args.warmup_s)


if __name__ == "__main__":
    run()
