"""Network namespaces: sockets made inside one by NetNamespace, telemetry delivered through them, the environment's
APIs at 127.0.0.1:9001 inside and on the host's loopback outside, two environments whose extensions listen on the same
port, the degraded mode, and nothing left behind (threads, fds, namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lambdabox.core.model import Response
from lambdabox.core.telemetry import parse_telemetry_subscription
from lambdabox.environment.delivery import open_telemetry_hub
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import TelemetryEvent
from lambdabox.sandbox.netns import NetNamespace
from support import Collector, collector, make_function, run

NETNS = os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "nsenter", "ip"))
needs_netns = pytest.mark.skipif(not NETNS, reason="needs root, unshare, nsenter and ip")
DEADLINE_S = 5.0
WAIT_S = 10.0
EXTENSION_PORT = 4243  # the port of AWS's published Logs and Telemetry API extension examples

NewNamespace = Callable[[], str]


@pytest.fixture
def new_namespace() -> Iterator[NewNamespace]:
    """Makes processes alone in a new network namespace (``lo`` up), each one's namespace path; all end after."""
    holders: list[subprocess.Popen[bytes]] = []

    def make() -> str:
        script = "ip link set lo up && echo ready && exec cat >/dev/null"
        proc = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        holders.append(proc)
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
        assert readable and proc.stdout.readline() == b"ready\n"
        return f"/proc/{proc.pid}/ns/net"

    try:
        yield make
    finally:
        for proc in holders:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()  # its cat sees EOF
            proc.wait(DEADLINE_S)
            proc.stdout.close()


def netns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("netns:")]


def in_namespace(inode: int) -> list[str]:
    """Every task of the machine whose network namespace is ``inode``."""
    found = []
    for link in Path("/proc").glob("[0-9]*/task/*/ns/net"):
        with contextlib.suppress(OSError):
            if os.stat(link).st_ino == inode:
                found.append(str(link))
    return found


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ---- NetNamespace ----------------------------------------------------------------------------------------------


@needs_netns
def test_sockets_made_inside_belong_to_the_namespace(new_namespace: NewNamespace) -> None:
    with NetNamespace(new_namespace()) as ns, ns.socket() as listener:
        assert ns.call(socket.if_nameindex) == [(1, "lo")]
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with ns.socket() as inside:
            inside.connect(("127.0.0.1", port))  # lo is up in there
            listener.accept()[0].close()
        with socket.socket() as outside, pytest.raises(ConnectionRefusedError):
            outside.connect(("127.0.0.1", port))  # nothing listens there on the host's loopback


@needs_netns
def test_two_namespaces_listen_on_9001_at_once(new_namespace: NewNamespace) -> None:
    with NetNamespace(new_namespace()) as one, NetNamespace(new_namespace()) as two:
        assert one.inode != two.inode
        listeners = []
        for ns in (one, two):
            listener = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 9001))
            listener.listen()
            listener.settimeout(DEADLINE_S)
            listeners.append(listener)
        for ns, listener, greeting in ((one, listeners[0], b"one"), (two, listeners[1], b"two")):
            with ns.socket() as client:
                client.settimeout(DEADLINE_S)
                client.connect(("127.0.0.1", 9001))
                client.sendall(greeting)
                conn, _ = listener.accept()
                with conn:
                    assert conn.recv(16) == greeting  # each listener got its own namespace's client
        for listener in listeners:
            listener.close()


@needs_netns
def test_closed_namespace_refuses_sockets_and_leaves_no_thread(new_namespace: NewNamespace) -> None:
    path = new_namespace()
    fds = open_fds()
    ns = NetNamespace(path)
    assert len(netns_threads()) == 1
    ns.close()
    ns.close()  # idempotent
    assert netns_threads() == []
    with pytest.raises(OSError, match="closed"):
        ns.socket()
    assert open_fds() == fds


@needs_netns
def test_what_is_not_a_network_namespace_is_refused() -> None:
    with pytest.raises(FileNotFoundError):
        NetNamespace("/proc/self/ns/no-such-namespace")
    with pytest.raises(OSError, match="setns"):
        NetNamespace("/proc/self/ns/uts")
    assert netns_threads() == []


@needs_netns
def test_socket_hop_costs_little(new_namespace: NewNamespace) -> None:
    """Not a timing test (see bench/): only that many sockets in a row come and go without error or leak."""
    path = new_namespace()
    fds = open_fds()
    with NetNamespace(path) as ns:
        for _ in range(200):
            ns.socket().close()
    assert open_fds() == fds


# ---- delivery through the namespace ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_listener(ns: NetNamespace, received: list[Any], changed: asyncio.Event) -> AsyncIterator[int]:
    async def handle(request: web.Request) -> web.Response:
        received.extend(await request.json())
        changed.set()
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    sock = ns.socket()
    sock.bind(("127.0.0.1", EXTENSION_PORT))
    await web.SockSite(runner, sock).start()
    try:
        yield EXTENSION_PORT
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def tcp_listener(ns: NetNamespace, received: list[Any], changed: asyncio.Event) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            while raw := await reader.readline():
                received.append(json.loads(raw))
                changed.set()

    sock = ns.socket()
    sock.bind(("127.0.0.1", EXTENSION_PORT))
    server = await asyncio.start_server(handle, sock=sock)
    try:
        yield EXTENSION_PORT
    finally:
        server.close()
        await server.wait_closed()


@needs_netns
@pytest.mark.parametrize("protocol", ["HTTP", "TCP"])
def test_telemetry_is_delivered_inside_the_namespace(new_namespace: NewNamespace, protocol: str) -> None:
    async def body(ns: NetNamespace) -> list[Any]:
        received: list[Any] = []
        changed = asyncio.Event()
        listener = http_listener if protocol == "HTTP" else tcp_listener
        async with listener(ns, received, changed) as port, open_telemetry_hub(socket_factory=ns.socket) as hub:
            destination: dict[str, Any] = {"protocol": "TCP", "port": port}
            if protocol == "HTTP":
                destination = {"protocol": "HTTP", "URI": f"http://sandbox.localdomain:{port}/in"}
            subscription = {"schemaVersion": "2022-12-13", "types": ["function"], "destination": destination}
            hub.subscribe("ext", parse_telemetry_subscription({**subscription, "buffering": {"timeoutMs": 25}}))
            hub.observe(TelemetryEvent(1_700_000_000.0, "function", "hello from the host", "runtime"))
            async with asyncio.timeout(WAIT_S):
                await hub.flush()
                while not received:
                    changed.clear()
                    await changed.wait()
        return received

    path = new_namespace()
    fds = open_fds()
    with NetNamespace(path) as ns:
        received = run(body(ns))
    assert [r["record"] for r in received] == ["hello from the host"]
    assert open_fds() == fds


# ---- environments ----------------------------------------------------------------------------------------------


@needs_netns
def test_environment_serves_the_apis_at_9001_inside_and_on_the_host_outside(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.echo_env")

    async def body() -> tuple[str, str, tuple[str, ...], Any, int]:
        async with open_environment(config) as env, aiohttp.ClientSession() as http:
            result = await env.invoke(json.dumps({"keys": ["AWS_LAMBDA_RUNTIME_API"]}).encode())
            async with http.get(f"http://{env.host_api}/no-such-path") as answer:
                status = answer.status  # the host reaches the same server
            return env.runtime_api, env.host_api, env.degraded, result.outcome, status

    runtime_api, host_api, degraded, outcome, status = run(body())
    assert runtime_api == "127.0.0.1:9001"
    assert host_api.startswith("127.0.0.1:") and host_api != runtime_api
    assert not any("network namespace" in d for d in degraded)
    assert isinstance(outcome, Response)
    assert json.loads(outcome.body)["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001"  # the runtime reached it there
    assert status == 404


def test_without_a_namespace_the_apis_are_on_a_host_port_and_it_says_so(tmp_path: Path) -> None:
    async def body() -> tuple[str, str, tuple[str, ...], NetNamespace | None]:
        async with open_environment(make_function(tmp_path), Options(isolate=False)) as env:
            return env.runtime_api, env.host_api, env.degraded, env.netns

    runtime_api, host_api, degraded, netns = run(body())
    assert netns is None and runtime_api == host_api
    assert (
        f"no network namespace (isolate=False): the Runtime API is at {host_api}, not 127.0.0.1:9001, "
        "and extensions share the host's ports"
    ) in degraded


def subscriber(tmp_path: Path, sink_url: str) -> Any:
    tmp_path.mkdir()
    settings = {"TEL_SINK": sink_url, "TEL_PORT": str(EXTENSION_PORT), "TEL_TYPES": "platform"}
    return make_function(tmp_path, extensions={"sub": "telemetry_ext.py"}, environment=settings)


@needs_netns
def test_extensions_of_two_concurrent_environments_both_listen_on_4243(tmp_path: Path) -> None:
    async def body(sink: Collector) -> dict[str, str]:
        one, two = subscriber(tmp_path / "one", sink.url), subscriber(tmp_path / "two", sink.url)
        async with open_environment(one) as env1, open_environment(two) as env2:
            await sink.listen_in(env1)
            await sink.listen_in(env2)
            results = await asyncio.gather(env1.invoke(b"{}"), env2.invoke(b"{}"))
            assert all(isinstance(r.outcome, Response) for r in results), results
        return {r.request_id: env for r, env in zip(results, ("one", "two"), strict=True)}

    async def go() -> tuple[dict[str, str], Collector]:
        async with collector() as sink:  # it outlives the environments: their records are flushed at SHUTDOWN
            return await body(sink), sink

    which, sink = run(go())
    pids = {b["pid"] for b in sink.batches}
    assert len(pids) == 2 and {b["port"] for b in sink.batches} == {EXTENSION_PORT}
    starts: dict[int, set[str]] = {pid: set() for pid in pids}
    for batch in sink.batches:
        starts[batch["pid"]].update(r["record"]["requestId"] for r in batch["records"] if r["type"] == "platform.start")
    assert sorted(len(s) for s in starts.values()) == [1, 1]  # each extension got its own environment's invoke
    assert {which[next(iter(s))] for s in starts.values()} == {"one", "two"}
    subscribed = [r["record"] for r in sink.records() if r["type"] == "test.subscribed"]
    assert [s["status"] for s in subscribed] == [200, 200]


@needs_netns
def test_an_environment_leaves_no_thread_fd_or_namespace_behind(tmp_path: Path) -> None:
    config = make_function(tmp_path, "handler.ok")
    fds, threads = open_fds(), set(threading.enumerate())

    async def body() -> tuple[int, list[str]]:
        async with open_environment(config) as env:
            assert env.netns is not None
            await env.invoke(b"{}")
            inode = env.netns.inode
            inside = in_namespace(inode)
        return inode, inside

    inode, inside = run(body())
    assert inside  # the holder, the runtime and the namespace's thread were in it
    assert in_namespace(inode) == []
    assert netns_threads() == [] and set(threading.enumerate()) <= threads
    assert open_fds() == fds
