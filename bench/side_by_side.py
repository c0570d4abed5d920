"""lambdabox's user-facing processes side by side with AWS's Runtime Interface Emulator (RIE): start-up, the cold
first invoke, warm invokes and their CPU, and ``lambdabox invoke`` as a whole process, all with the same
awslambdaric runtime and no-op handler, interleaved in rotating blocks.

What runs:

- ``lambdabox start-lambda`` (the CLI process, as users run it: isolation, freeze and the network namespace on, the
  defaults) for a template of one no-op Python function;
- with ``--rie PATH``, the RIE binary given (built from its public source; never part of lambdabox), running the
  same interpreter and awslambdaric that lambdabox installed for the function's runtime, in a directory holding the
  same handler: ``aws-lambda-rie <interpreter> -m awslambdaric handler.handler``;
- ``lambdabox invoke`` of the same template, a whole process (the function's code and runtime already cached, as
  after a first run);
- the floor of a whole-process run: the same interpreter and awslambdaric started against a minimal Runtime API in
  this process that hands it one event and takes its response, then ended (the least any tool can do to run the
  handler once); and with ``--rie``, the same one-shot through RIE (start it, one invoke, end it).

Each server session: start the process; *ready* is the time from spawning it to its port accepting a connection;
*cold* is the first invoke's latency (lambdabox and RIE both start the runtime for it); then ``--warmup`` untimed
invokes and ``--invokes`` timed ones, back to back at concurrency 1 over one keep-alive ``http.client`` connection
from this process (latency: request to body read); *CPU per invoke* is the user + system CPU time of the server's
whole process tree (server, runtime, and for lambdabox its namespace holders and slirp4netns) over the timed
invokes, divided by their number; then SIGTERM and the time until the process has ended (for information). The
client's own CPU is not counted on either side.

Where a target is missed, the bench says which part of the time is the floor's and which is lambdabox's: the cold
invoke split into its Init Duration (the runtime's own start, from lambdabox's REPORT line) and the rest, and
``lambdabox invoke`` into the interpreter's start, importing lambdabox's CLI (both timed as cases of their own) and
the run. ``--lambdabox-option`` (e.g. ``--no-freeze``) runs lambdabox with an option, to see what each costs;
``--start-lambda-option`` (e.g. ``--open-ahead``) gives one to start-lambda only.
lambdabox's modules are byte-compiled first, as a pip install leaves them.

A round runs every case once, in an order that rotates each round, so that load from elsewhere falls on every case
alike; figures are medians over the rounds (each round's own figure is a median of its invokes).

Targets (issue 12): warm p50 <= 0.7 x RIE and CPU per invoke <= RIE's; cold <= 1.0 x RIE; start-lambda ready in
under 300 ms; ``lambdabox invoke`` <= 1.5 x the bare one-shot run.

Run: ``.venv/bin/python bench/side_by_side.py --rie /path/to/aws-lambda-rie`` (without ``--rie``, the lambdabox
rows and the floor only; ``--rounds``, ``--invokes``, ``--warmup`` to change the counts).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import http.client
import http.server
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
from common import ms, percentile

import lambdabox as package

PYTHON = sys.executable
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lambdabox"
LANG_PYTHON = CACHE / "lang" / RUNTIME / "bin" / RUNTIME  # lambdabox's /var/lang interpreter for the runtime
RUNTIME_DIR = CACHE / "runtime" / RUNTIME  # its /var/runtime: awslambdaric
FUNCTION = "Noop"
READY_S = 30.0  # a server's start, bounded
STOP_S = 20.0
INVOKE_S = 30.0
INIT_DURATION = re.compile(r"Init Duration: ([0-9.]+) ms")
POLL_S = 0.0005  # how often the port is tried while a server starts
TARGET_WARM = 0.7
TARGET_COLD = 1.0
TARGET_READY_S = 0.3
TARGET_ONE_SHOT = 1.5

HANDLER = "def handler(event, context):\n    return None\n"
TEMPLATE = f"""\
Transform: AWS::Serverless-2016-10-31
Resources:
  {FUNCTION}:
    Type: AWS::Serverless::Function
    Properties:
      Runtime: {RUNTIME}
      Handler: handler.handler
      CodeUri: code/
      MemorySize: 128
      Timeout: 10
"""


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before it listened")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(POLL_S)
    raise RuntimeError(f"{process.args!r} did not listen on {port} in time")


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def end(process: subprocess.Popen[bytes], members: list[psutil.Process], sig: int = signal.SIGTERM) -> float:
    """Signal the server, wait for it (bounded), then make sure nothing of its tree is left; the seconds it took.
    With SIGKILL its children are killed first, so that it reaps them (as orphans they would wait for init)."""
    t0 = time.monotonic()
    if sig == signal.SIGKILL:
        for member in members[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    process.send_signal(sig)
    deadline = threading.Timer(STOP_S, process.kill)  # (Popen.wait with a timeout polls, up to 50 ms late)
    deadline.start()
    try:
        process.wait()
    finally:
        deadline.cancel()
    seconds = time.monotonic() - t0
    for member in members[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    deadline = time.monotonic() + STOP_S
    while any(alive(m) for m in members[1:]):  # (an orphan's zombie waits for init: dead is enough)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {process.args!r} outlived it")
        time.sleep(POLL_S)
    return seconds


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- a server session: start, cold invoke, warm invokes, stop ------------------------------------------------


@dataclass
class Session:
    ready_s: float
    cold_s: float
    warm_s: list[float]
    cpu_per_invoke_s: float
    stop_s: float
    init_s: float | None  # lambdabox's Init Duration of the cold invoke, from its REPORT line (None for RIE)


@dataclass
class Server:
    name: str
    command: Callable[[int], list[str]]  # port -> argv
    path: str  # the Invoke API path of the function
    cwd: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def session(server: Server, invokes: int, warmup: int) -> Session:
    with tempfile.TemporaryFile() as log:
        return _session(server, invokes, warmup, log)


def start(server: Server, port: int, stderr: IO[bytes] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        server.command(port),
        cwd=server.cwd,
        env=server.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def _session(server: Server, invokes: int, warmup: int, log: IO[bytes]) -> Session:
    port = free_port()
    t0 = time.monotonic()
    process = start(server, port, log)
    members: list[psutil.Process] = [psutil.Process(process.pid)]
    try:
        wait_for_port(port, process, t0 + READY_S)
        ready = time.monotonic() - t0
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=INVOKE_S)
        cold = invoke(connection, server.path)
        for _ in range(warmup):
            invoke(connection, server.path)
        members = tree(process.pid)
        cpu0 = cpu_s(members)
        warm = [invoke(connection, server.path) for _ in range(invokes)]
        cpu = cpu_s(members) - cpu0
        connection.close()
    finally:
        stop = end(process, members)
        log.seek(0)
        said = log.read().decode(errors="replace")
    found = INIT_DURATION.search(said)
    return Session(ready, cold, warm, cpu / invokes, stop, float(found.group(1)) / 1000 if found else None)


def invoke(connection: http.client.HTTPConnection, path: str) -> float:
    t0 = time.perf_counter()
    connection.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    body = answer.read()
    seconds = time.perf_counter() - t0
    if answer.status != 200 or body.strip() != b"null":
        raise RuntimeError(f"invoke answered {answer.status}: {body[:300]!r}")
    return seconds


# ---- whole-process one-shots --------------------------------------------------------------------------------


def lambdabox_invoke(project: Path, options: list[str]) -> float:
    t0 = time.monotonic()
    out = subprocess.run(
        [PYTHON, "-m", "lambdabox", "invoke", "-t", "template.yaml", "--no-timeline-console", *options],
        cwd=project,
        capture_output=True,
        timeout=INVOKE_S,
        check=False,
    )
    seconds = time.monotonic() - t0
    if out.returncode != 0 or out.stdout.strip() != b"null":
        raise RuntimeError(f"lambdabox invoke: {out.returncode} {out.stdout[-300:]!r} {out.stderr[-600:]!r}")
    return seconds


class _OneEvent(http.server.BaseHTTPRequestHandler):
    """A minimal Runtime API: the first /next gets the event; the response is kept; a second /next is not answered
    (the runtime is ended by then)."""

    protocol_version = "HTTP/1.1"
    done: threading.Event
    served: list[bool]

    def do_GET(self) -> None:
        if self.served[0]:
            self.done.wait(INVOKE_S)
            return
        self.served[0] = True
        body = b"{}"
        self.send_response(200)
        for name, value in (
            ("Lambda-Runtime-Aws-Request-Id", "00000000-0000-4000-8000-000000000001"),
            ("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 10_000)),
            ("Lambda-Runtime-Invoked-Function-Arn", f"arn:aws:lambda:us-east-1:123456789012:function:{FUNCTION}"),
            ("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000001;Sampled=0"),  # awslambdaric needs it
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.done.set()

    def log_message(self, format: str, *args: object) -> None:
        pass


def python_start(code: str) -> float:
    """A Python process running ``code`` (``pass``: the interpreter's start; lambdabox's CLI import), whole."""
    t0 = time.monotonic()
    subprocess.run([PYTHON, "-c", code], check=True, timeout=INVOKE_S)
    return time.monotonic() - t0


class _OneEventServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # (the runtime, killed, resets its connection)
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def bare_one_shot(code: Path) -> float:
    """awslambdaric started against a minimal Runtime API, one event, its response, then ended: the floor."""
    done = threading.Event()
    handler = type("Handler", (_OneEvent,), {"done": done, "served": [False]})
    with _OneEventServer(("127.0.0.1", 0), handler) as api:
        threading.Thread(target=api.serve_forever, daemon=True).start()
        env = runtime_env() | {"AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{api.server_address[1]}"}
        t0 = time.monotonic()
        process = subprocess.Popen(
            [str(LANG_PYTHON), "-m", "awslambdaric", "handler.handler"],
            cwd=code,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if not done.wait(INVOKE_S):
                raise RuntimeError("the bare runtime did not respond")
        finally:
            process.kill()
            process.wait(STOP_S)
        seconds = time.monotonic() - t0
        api.shutdown()
    return seconds


def rie_one_shot(server: Server) -> float:
    port = free_port()
    t0 = time.monotonic()
    process = start(server, port)
    members = [psutil.Process(process.pid)]
    try:
        wait_for_port(port, process, t0 + READY_S)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=INVOKE_S)
        invoke(connection, server.path)
        connection.close()
        members = tree(process.pid)
    finally:
        end(process, members, signal.SIGKILL)
    return time.monotonic() - t0


def runtime_env() -> dict[str, str]:
    """What the runtime needs to find awslambdaric and the handler, and the function's settings (as lambdabox and
    RIE give them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return env | {
        "PYTHONPATH": f".:{RUNTIME_DIR}",
        "_HANDLER": "handler.handler",
        "AWS_LAMBDA_FUNCTION_NAME": FUNCTION,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "10",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


# ---- main ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def project() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lambdabox-sbs-") as top:
        root = Path(top)
        (root / "code").mkdir()
        (root / "code" / "handler.py").write_text(HANDLER)
        (root / "template.yaml").write_text(TEMPLATE)
        (root / ".lambdabox").mkdir()
        yield root


def median(values: list[float]) -> float:
    return statistics.median(values)


def row(name: str, ours: float, peer: float | None, unit: str = "ms", target: str = "") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    peer_text = "" if peer is None else f"{peer * scale:10.3f}"
    ratio = "" if not peer else f"{ours / peer:7.2f}"
    return f"{name:<38} {ours * scale:10.3f} {peer_text:>10} {ratio:>7}   {target}"


def main(rie: Path | None, rounds: int, invokes: int, warmup: int, options: list[str], serving: list[str]) -> int:
    # lambdabox's modules with their bytecode cached, as a pip install leaves them (an editable install under
    # PYTHONDONTWRITEBYTECODE would compile every module at every start: about 50 ms more each time here)
    compileall.compile_dir(Path(package.__file__).parent, quiet=1)
    if not LANG_PYTHON.exists() or not (RUNTIME_DIR / "awslambdaric").is_dir():
        print(f"{RUNTIME} is not installed in lambdabox's cache yet: run `lambdabox invoke` once on any function")
        return 2
    print(
        f"side by side: {rounds} rounds; per server session 1 cold + {warmup} untimed + {invokes} timed invokes; "
        f"load average {load()}"
        + (f"; lambdabox options: {' '.join(options)}" if options else "")
        + (f"; start-lambda options: {' '.join(serving)}" if serving else "")
    )
    with project() as root:
        lambdabox = Server(
            "lambdabox start-lambda",
            lambda port: [
                PYTHON,
                "-m",
                "lambdabox",
                "start-lambda",
                "-t",
                "template.yaml",
                "-p",
                str(port),
                *options,
                *serving,
            ],
            f"/2015-03-31/functions/{FUNCTION}/invocations",
            root,
        )
        cases: dict[str, Callable[[], object]] = {
            "lambdabox start-lambda": lambda: session(lambdabox, invokes, warmup),
            "lambdabox invoke": lambda: lambdabox_invoke(root, options),
            "bare one-shot": lambda: bare_one_shot(root / "code"),
            "python start": lambda: python_start("pass"),
            "lambdabox import": lambda: python_start("import lambdabox.cli"),
        }
        if rie is not None:
            peer = Server(
                "RIE",
                lambda port: [
                    str(rie),
                    "--log-level",
                    "error",
                    "--runtime-interface-emulator-address",
                    f"127.0.0.1:{port}",
                    "--runtime-api-address",
                    f"127.0.0.1:{free_port()}",
                    str(LANG_PYTHON),
                    "-m",
                    "awslambdaric",
                    "handler.handler",
                ],
                "/2015-03-31/functions/function/invocations",
                root / "code",
                runtime_env(),
            )
            cases["RIE"] = lambda: session(peer, invokes, warmup)
            cases["RIE one-shot"] = lambda: rie_one_shot(peer)
        lambdabox_invoke(root, options)  # stages the code and the runtime once, untimed
        results: dict[str, list[object]] = {name: [] for name in cases}
        names = list(cases)
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(cases[name]())
    report(results, rie is not None)
    return 0


def report(results: dict[str, list[object]], with_rie: bool) -> None:
    ours = [s for s in results["lambdabox start-lambda"] if isinstance(s, Session)]
    peers = [s for s in results.get("RIE", []) if isinstance(s, Session)]

    def med(sessions: list[Session], pick: Callable[[Session], float]) -> float | None:
        return median([pick(s) for s in sessions]) if sessions else None

    def both(pick: Callable[[Session], float]) -> tuple[float, float | None]:
        value = med(ours, pick)
        assert value is not None
        return value, med(peers, pick)

    print()
    header = f"{'case (median of rounds)':<38} {'lambdabox':>10} {'RIE':>10} {'ratio':>7}   target"
    print(header)
    print("-" * len(header))
    ready = both(lambda s: s.ready_s)
    print(row("start-lambda ready (port open), ms", *ready, target=f"< {TARGET_READY_S * 1000:.0f} ms"))
    cold = both(lambda s: s.cold_s)
    print(row("cold first invoke, ms", *cold, target=f"<= {TARGET_COLD} x RIE"))
    p50 = both(lambda s: median(s.warm_s))
    print(row("warm invoke p50, ms", *p50, target=f"<= {TARGET_WARM} x RIE"))
    print(row("warm invoke p99, ms", *both(lambda s: percentile(s.warm_s, 99))))
    cpu = both(lambda s: s.cpu_per_invoke_s)
    print(row("CPU per warm invoke (tree), ms", *cpu, target="<= RIE's"))
    print(row("stop (SIGTERM to exit), ms", *both(lambda s: s.stop_s)))
    one_shot, bare, start, imported = (
        median([float(x) for x in results[name]])  # type: ignore[arg-type]
        for name in ("lambdabox invoke", "bare one-shot", "python start", "lambdabox import")
    )
    print(row("lambdabox invoke (whole process), ms", one_shot, bare, target=f"<= {TARGET_ONE_SHOT} x bare"))
    print(row("bare one-shot (floor), ms", bare, None))
    if with_rie:
        rie_shot = median([float(x) for x in results["RIE one-shot"]])  # type: ignore[arg-type]
        print(row("RIE one-shot (whole process), ms", rie_shot, bare))
    print()
    print("where the time goes (medians, ms):")
    inits = [s.init_s for s in ours if s.init_s is not None]
    if inits:
        init = median(inits)
        print(
            f"  cold first invoke {ms(cold[0]):.1f} = Init Duration {ms(init):.1f} (the runtime's own start, which is "
            f"most of RIE's whole cold invoke) + {ms(cold[0] - init):.1f} of lambdabox's (the environment's opening: "
            "cgroups, namespaces, slirp4netns, Lambda's filesystem, its APIs; and the invoke)"
        )
    print(
        f"  lambdabox invoke {ms(one_shot):.1f} = the interpreter's start {ms(start):.1f} + importing lambdabox's CLI "
        f"{ms(imported - start):.1f} + the run {ms(one_shot - imported):.1f} (opening, Init, invoke, shutdown); "
        f"the bare floor is an interpreter's start and awslambdaric's, {ms(bare):.1f} in all"
    )
    print()
    print("each round (lambdabox / RIE): warm p50 ms, cold ms")
    for index, session_ in enumerate(ours):
        peer = peers[index] if index < len(peers) else None
        peer_text = "" if peer is None else f" / {ms(median(peer.warm_s)):.3f}, {ms(peer.cold_s):.1f}"
        print(f"  round {index + 1}: {ms(median(session_.warm_s)):.3f}, {ms(session_.cold_s):.1f}{peer_text}")
    print(f"load average after the run: {load()}")
    print()
    checks = [
        ("start-lambda ready", ready[0] < TARGET_READY_S),
        ("lambdabox invoke", one_shot <= TARGET_ONE_SHOT * bare),
    ]
    if with_rie and p50[1] and cold[1] and cpu[1]:
        checks += [
            ("warm p50", p50[0] <= TARGET_WARM * p50[1]),
            ("cold", cold[0] <= TARGET_COLD * cold[1]),
            ("CPU per invoke", cpu[0] <= cpu[1]),
        ]
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks))


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rie", type=Path, help="the aws-lambda-rie binary to run beside lambdabox")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--invokes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--lambdabox-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option for start-lambda and invoke, e.g. --no-freeze or --host-network, to see what each costs",
    )
    parser.add_argument(
        "--start-lambda-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option for start-lambda only, e.g. --open-ahead",
    )
    args = parser.parse_args()
    if args.rie is not None and not (args.rie.is_file() and os.access(args.rie, os.X_OK)):
        parser.error(f"--rie {args.rie}: not an executable file")
    if shutil.which("slirp4netns") is None:
        print("note: slirp4netns is not installed: lambdabox runs without outbound network (degraded)")
    sys.exit(main(args.rie, args.rounds, args.invokes, args.warmup, args.lambdabox_option, args.start_lambda_option))


if __name__ == "__main__":
    run()
