"""Test support: build functions and layers from the scripts in tests/fixtures, run an environment, record events."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import zipfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from lambdabox.core.model import FunctionConfig, LayerConfig
from lambdabox.environment.opening import open_environment
from lambdabox.environment.report import Observer, TelemetryEvent
from lambdabox.environment.runner import Environment
from lambdabox.loop import run as run_loop

FIXTURES = Path(__file__).parent / "fixtures"
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"
T = TypeVar("T")


def host_cgroups() -> str | None:
    """The cgroup hierarchy environments get here ("v2" or "v1"), None where they get none (not root, no
    controllers): what cgroup tests need."""
    from lambdabox.sandbox.cgroups import CGROUP_ROOT

    if os.geteuid() != 0:
        return None
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        controllers = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
        return "v2" if {"memory", "pids"} <= controllers else None
    v1 = (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists() and (CGROUP_ROOT / "freezer").is_dir()
    return "v1" if v1 else None


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a coroutine to completion with a deadline (tests are synchronous; no plugin needed)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return run_loop(bounded())


def extension_script(name: str) -> bytes:
    """A fixture extension; Python ones get this interpreter in the shebang so they start fast."""
    data = (FIXTURES / name).read_bytes()
    if data.startswith(b"#!/usr/bin/env python3"):
        data = f"#!{sys._base_executable}".encode() + data[len(b"#!/usr/bin/env python3") :]
    return data


def build_layer(path: Path, files: Mapping[str, tuple[bytes, int]]) -> Path:
    """A layer zip with the given entries: name -> (content, mode)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (content, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, content)
    return path


def extensions_layer(tmp_path: Path, extensions: Mapping[str, str], name: str = "extensions.zip") -> LayerConfig:
    """A layer holding /opt/extensions/<ext name> for each ext name -> fixture script."""
    files = {f"extensions/{ext}": (extension_script(script), 0o755) for ext, script in extensions.items()}
    return LayerConfig(name, build_layer(tmp_path / name, files))


def make_function(
    tmp_path: Path,
    handler: str = "handler.ok",
    *,
    extensions: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
    timeout_s: float = 3.0,
    memory_mb: int = 128,
    runtime: str = PYTHON,
    layers: tuple[LayerConfig, ...] = (),
) -> FunctionConfig:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    for name in ("handler.py", "init_error.py"):
        shutil.copy(FIXTURES / name, code / name)
    if extensions:
        layers = (extensions_layer(tmp_path, extensions), *layers)
    return FunctionConfig(
        logical_id="Fn",
        function_name="Fn",
        runtime=runtime,
        handler=handler,
        code=code,
        layers=layers,
        environment=dict(environment or {}),
        timeout_s=timeout_s,
        memory_mb=memory_mb,
    )


@dataclass
class Recorder:
    """Collects every event an environment emits, in order."""

    events: list[TelemetryEvent] = field(default_factory=list)

    def __call__(self, event: TelemetryEvent) -> None:
        self.events.append(event)

    def types(self, prefix: str = "platform.") -> list[str]:
        return [e.type for e in self.events if e.type.startswith(prefix)]

    def records(self, type_: str) -> list[Any]:
        return [e.record for e in self.events if e.type == type_]

    def lines(self, source: str | None = None) -> list[str]:
        return [
            str(e.record)
            for e in self.events
            if e.type in ("function", "extension") and (source is None or e.source == source)
        ]

    def extension_says(self, what: str) -> list[dict[str, Any]]:
        """JSON lines printed by tests/fixtures/ext.py with the given 'what'."""
        found = []
        for line in self.lines():
            if line.startswith("{"):
                item = json.loads(line)
                if item.get("what") == what:
                    found.append(item)
        return found


# ---- the test plays the runtime (and extensions) over HTTP: their processes only sleep ----

SLEEPER = b"#!/bin/sh\nexec sleep 600\n"
RUNTIME = "/2018-06-01/runtime"


def sleeping_function(tmp_path: Path, extensions: tuple[str, ...] = ()) -> FunctionConfig:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "bootstrap").write_bytes(SLEEPER)
    (code / "bootstrap").chmod(0o755)
    layers: tuple[LayerConfig, ...] = ()
    if extensions:
        files = {f"extensions/{name}": (SLEEPER, 0o755) for name in extensions}
        layers = (LayerConfig("ext", build_layer(tmp_path / "ext.zip", files)),)
    return FunctionConfig("Fn", "Fn", "provided.al2023", "app.handler", code, layers, timeout_s=5)


@asynccontextmanager
async def playing_runtime(
    config: FunctionConfig, observers: Iterable[Observer] = ()
) -> AsyncIterator[tuple[Environment, aiohttp.ClientSession, str]]:
    async with open_environment(config, None, observers) as env, aiohttp.ClientSession() as http:
        yield env, http, f"http://{env.host_api}"


# ---- a collector for the subscriber extensions ----


class Collector:
    """What the subscriber extensions (tests/fixtures/telemetry_ext.py) forward to TEL_SINK: every record they
    received, in arrival order. It listens on the host's loopback and, once an environment is open, on the same port
    inside the environment's network namespace (:meth:`listen_in`), so TEL_SINK is one URL either way."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.url = ""
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def receive(self, request: web.Request) -> web.Response:
        self.batches.append(await request.json())
        async with self.changed:
            self.changed.notify_all()
        return web.Response()

    def records(self, ext: str | None = None) -> list[dict[str, Any]]:
        return [r for b in self.batches if ext is None or b["ext"] == ext for r in b["records"]]

    def types(self, ext: str | None = None) -> list[str]:
        return [r["type"] for r in self.records(ext)]

    async def wait_for(self, check: Callable[[], bool], seconds: float = 10.0) -> None:
        async with asyncio.timeout(seconds), self.changed:
            await self.changed.wait_for(check)

    async def listen_in(self, env: Environment) -> None:
        """Listen on the same port inside the environment's network namespace too (none in the degraded mode)."""
        if env.netns is None:
            return
        assert self.runner is not None
        sock = env.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", self.port))
            await web.SockSite(self.runner, sock).start()
        except BaseException:
            sock.close()
            raise


@asynccontextmanager
async def collector() -> AsyncIterator[Collector]:
    sink = Collector()
    app = web.Application()
    app.router.add_post("/", sink.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    sink.url, sink.port, sink.runner = f"http://{host}:{port}/", port, runner
    try:
        yield sink
    finally:
        await runner.cleanup()
