"""Network namespaces: sockets made inside one by the environment's holder, telemetry delivered through them, the
environment's APIs at 127.0.0.1:9001 inside and on the host's loopback outside, two environments whose extensions
listen on the same port, the degraded mode, and nothing left behind (threads, fds, namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lambdabox.core.model import Response
from lambdabox.core.telemetry import parse_telemetry_subscription
from lambdabox.environment.delivery import TelemetryHub, open_telemetry_hub
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import TelemetryEvent
from lambdabox.sandbox.held import Holder
from lambdabox.sandbox.isolation import open_isolation
from lambdabox.sandbox.namespace import Layout
from support import Collector, collector, make_function, run

NETNS = os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "nsenter", "ip"))
needs_netns = pytest.mark.skipif(not NETNS, reason="needs root, unshare, nsenter and ip")
DEADLINE_S = 5.0
WAIT_S = 10.0
EXTENSION_PORT = 4243  # the port of AWS's published Logs and Telemetry API extension examples


def make_layout(root: Path) -> Layout:
    for name in ("task", "opt", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return Layout(root / "task", root / "opt", root / "tmp")


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


# ---- delivery through the namespace ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_listener(ns: Holder, received: list[Any], changed: asyncio.Event) -> AsyncIterator[int]:
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
async def tcp_listener(ns: Holder, received: list[Any], changed: asyncio.Event) -> AsyncIterator[int]:
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
def test_telemetry_is_delivered_inside_the_namespace(tmp_path: Path, protocol: str) -> None:
    async def body() -> list[Any]:
        received: list[Any] = []
        changed = asyncio.Event()
        listener = http_listener if protocol == "HTTP" else tcp_listener
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="deliver") as iso:
            assert iso.sockets is not None
            async with (
                listener(iso.sockets, received, changed) as port,
                open_telemetry_hub(socket_factory=iso.sockets.socket) as hub,
            ):
                await deliver(hub, protocol, port, received, changed)
        return received

    run(body())  # the first name lookup starts the loop library's thread pool (with a pipe of its own, kept)
    fds = open_fds()
    received = run(body())
    assert [r["record"] for r in received] == ["hello from the host"]
    assert {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds() - fds} == {}


async def deliver(hub: TelemetryHub, protocol: str, port: int, received: list[Any], changed: asyncio.Event) -> None:
    """Subscribe to ``port`` inside over ``protocol``; one function record observed, delivered."""
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
    async def body() -> tuple[str, str, tuple[str, ...], Holder | None]:
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
    processes = {b["process"] for b in sink.batches}
    assert len(processes) == 2 and {b["port"] for b in sink.batches} == {EXTENSION_PORT}
    starts: dict[str, set[str]] = {process: set() for process in processes}
    for batch in sink.batches:
        starts[batch["process"]].update(
            r["record"]["requestId"] for r in batch["records"] if r["type"] == "platform.start"
        )
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
            inode = os.stat(f"/proc/{env.netns.init_pid}/ns/net").st_ino
            inside = in_namespace(inode)
        return inode, inside

    inode, inside = run(body())
    assert inside  # the holder's init and the runtime were in it
    assert in_namespace(inode) == []
    assert set(threading.enumerate()) <= threads
    assert open_fds() == fds
