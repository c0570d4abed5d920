"""examples/config-cache: configuration fetched during Init, served to the function on localhost:2772, refreshed
between invokes. The test serves the configuration, inside the environment's network namespace, and changes it."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from lambdabox.core.model import Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult, TelemetryEvent
from lambdabox.environment.runner import Environment
from lambdabox.template.load import load_template
from support import run

EXAMPLE = Path(__file__).parents[2] / "examples" / "config-cache"
V1 = b'{"greeting": "hello", "features": {"new-checkout": false}}'
V2 = b'{"greeting": "bonjour", "features": {"new-checkout": true}}'


def version(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


class Source:
    """The configuration's source: GET /settings answers the current content. Fetches and the environment's
    platform events go on one timeline (both happen in this event loop), to see when each fetch happened."""

    def __init__(self) -> None:
        self.content = V1
        self.timeline: list[tuple[str, Any]] = []
        self.port = 0

    async def settings(self, request: web.Request) -> web.Response:
        self.timeline.append(("fetch", version(self.content)))
        return web.Response(body=self.content, content_type="application/json")

    def observe(self, event: TelemetryEvent) -> None:
        if event.type in ("platform.initStart", "platform.start", "platform.report"):
            self.timeline.append((event.type, event.record.get("requestId")))

    def fetches(self) -> list[str]:
        return [what for kind, what in self.timeline if kind == "fetch"]


async def listen_in(runner: web.AppRunner, env: Environment, port: int) -> None:
    """Serve on the same port inside the environment's network namespace (none in the degraded mode)."""
    if env.netns is None:
        return
    sock = env.netns.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        raise


def test_fetched_before_the_first_invoke_and_refreshed_between_invokes() -> None:
    source = Source()

    async def go() -> list[InvokeResult]:
        app = web.Application()
        app.router.add_get("/settings", source.settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            overrides = {"ConfigSource": f"http://127.0.0.1:{port}/settings", "PollIntervalSeconds": "0"}
            config = load_template(EXAMPLE / "template.yaml", overrides).function("ShopFunction")
            async with open_environment(config, Options(), [source.observe]) as env:
                await listen_in(runner, env, port)
                results = [await env.invoke(b'{"name": "test"}')]
                source.content = V2  # changed between invokes, while the environment is frozen
                results += [await env.invoke(b'{"name": "test"}') for _ in range(2)]
                return results
        finally:
            await runner.cleanup()

    results = run(go())
    assert all(isinstance(r.outcome, Response) for r in results), results
    answers = [json.loads(r.outcome.body) for r in results if isinstance(r.outcome, Response)]
    assert answers[0] == {"message": "hello, test", "checkout": "classic", "version": version(V1)}
    # The second invoke's refresh runs while the function reads the copy in hand: either version may be served.
    assert answers[1]["version"] in (version(V1), version(V2))
    assert answers[2] == {"message": "bonjour, test", "checkout": "new", "version": version(V2)}

    timeline = source.timeline
    starts = [i for i, (kind, _) in enumerate(timeline) if kind == "platform.start"]
    reports = [i for i, (kind, _) in enumerate(timeline) if kind == "platform.report"]
    fetches = [i for i, (kind, _) in enumerate(timeline) if kind == "fetch"]
    assert len(fetches) == 4  # Init, then one refresh per invoke (poll interval 0)
    assert timeline[0][0] == "platform.initStart" and fetches[0] < starts[0]  # fetched during Init
    for start, fetch, report in zip(starts, fetches[1:], reports, strict=True):
        assert start < fetch < report  # each refresh inside an invoke, never while frozen
    assert source.fetches() == [version(V1), version(V1), version(V2), version(V2)]


def lambdabox(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "lambdabox", "invoke", "-t", str(EXAMPLE / "template.yaml"), *args]
    return subprocess.run(command, capture_output=True, timeout=120, check=False)


def test_the_layers_settings_by_default() -> None:
    done = lambdabox("-e", str(EXAMPLE / "event.json"), "--repeat", "2")
    assert done.returncode == 0, done.stderr.decode()
    layer_settings = (EXAMPLE / "layer" / "config-cache" / "settings.json").read_bytes()
    expected = {"message": "hello, lambdabox", "checkout": "classic", "version": version(layer_settings)}
    assert [json.loads(line) for line in done.stdout.decode().splitlines()] == [expected] * 2
    assert "[config-cache] fetched configuration" in done.stderr.decode()


def test_a_source_that_cannot_be_read_fails_init() -> None:
    done = lambdabox("--parameter-overrides", "ConfigSource=http://127.0.0.1:9/settings")  # nothing listens there
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["errorType"] == "Extension.ConfigUnavailable"
    assert "http://127.0.0.1:9/settings" in error["errorMessage"]
