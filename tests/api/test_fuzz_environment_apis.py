"""The four in-environment APIs (Runtime, Extensions, Logs, Telemetry) under random methods, paths, headers, bodies and
identifiers, sent by hypothesis to a live environment (a runtime and an extension waiting in their long-polls): no 5xx,
no traceback, and afterwards the environment still serves, each invoke with exactly one outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import (
    Background,
    assert_well_formed,
    background,
    bodies,
    exchange,
    header_text,
    methods,
    raw_request,
    segment,
)
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.report import TelemetryEvent
from lambdabox.environment.runner import Environment
from support import Recorder, make_function

RUNTIME = "/2018-06-01/runtime"
EXTENSION = "/2020-01-01/extension"
LONG_POLLS = {f"{RUNTIME}/invocation/next", f"{EXTENSION}/event/next"}  # they answer at the next event, by design
ROUTES = [
    ("GET", f"{RUNTIME}/invocation/next"), ("POST", f"{RUNTIME}/invocation/{{id}}/response"),
    ("POST", f"{RUNTIME}/invocation/{{id}}/error"), ("POST", f"{RUNTIME}/init/error"), ("GET", f"{RUNTIME}/{{x}}"),
    ("POST", f"{EXTENSION}/register"), ("GET", f"{EXTENSION}/event/next"), ("POST", f"{EXTENSION}/init/error"),
    ("POST", f"{EXTENSION}/exit/error"), ("POST", f"{EXTENSION}/{{x}}"), ("PUT", "/2020-08-15/logs"),
    ("PUT", "/2022-07-01/telemetry"), ("PUT", "/2020-08-15/logs/{x}"), ("GET", "/{x}"), ("POST", "/{x}/{x}"),
]  # fmt: skip
HEADERS = [
    "Lambda-Extension-Name", "Lambda-Extension-Identifier", "Lambda-Extension-Function-Error-Type",
    "Lambda-Extension-Accept-Feature", "Lambda-Runtime-Function-Error-Type", "Content-Type", "Expect",
    "Transfer-Encoding", "Lambda-Runtime-Function-Response-Mode",
]  # fmt: skip
SUBSCRIPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.sampled_from(["2022-12-13", "2021-03-18", "2020-08-15", "x"]),
        "types": st.lists(st.sampled_from(["platform", "function", "extension", "x"]), max_size=4),
        "buffering": st.dictionaries(st.sampled_from(["maxItems", "maxBytes", "timeoutMs"]), st.integers(-5, 10**7)),
        "destination": st.fixed_dictionaries(
            {"protocol": st.sampled_from(["HTTP", "TCP", "x"])},
            optional={"URI": st.sampled_from(["http://sandbox.localdomain:1/in", "ftp://x"]), "port": st.integers()},
        ),
    },
).map(lambda value: json.dumps(value).encode())


@contextlib.asynccontextmanager
async def _environment(tmp_path: Path, recorder: Recorder) -> AsyncIterator[Environment]:
    config = make_function(tmp_path, "handler.ok", extensions={"e": "ext.py"})
    async with open_environment(config, observers=[recorder]) as env:
        await env.invoke(b"{}")  # Init over, the runtime and the extension in their long-polls
        yield env


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Background, Recorder, str]]:
    recorder = Recorder()
    with background(lambda: _environment(tmp_path_factory.mktemp("fuzz-env"), recorder)) as held:
        identifier = next(iter(held.value.lifecycle.registry.live())).identifier
        yield held, recorder, identifier


@st.composite
def requests(draw: st.DrawFn, identifier: str) -> tuple[str, str, dict[str, str], bytes]:
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 4)) == 0:  # mostly the route's own method: past the router, into the handlers
        method = draw(methods)
    request_id = draw(st.one_of(st.uuids().map(str), segment))
    path = template.replace("{id}", request_id).replace("{x}", draw(segment))
    if draw(st.booleans()):
        path += "?" + draw(segment)
    names = draw(st.lists(st.sampled_from(HEADERS), unique=True, max_size=4))
    headers = {name: draw(header_text) for name in names}
    if draw(st.integers(0, 9)) == 0:  # now and then the real extension's identifier: deeper into the state
        headers["Lambda-Extension-Identifier"] = identifier
    if "Transfer-Encoding" in headers:
        headers.pop("Transfer-Encoding")  # (the body is sent sized: a bad chunked framing is the parser's test)
    if "Expect" in headers:
        headers["Expect"] = "100-continue"
    body = draw(SUBSCRIPTIONS if "logs" in path or "telemetry" in path else bodies)
    return method, path, headers, body


def test_fuzz_the_in_environment_apis(live: tuple[Background, Recorder, str]) -> None:
    held, _, identifier = live
    env: Environment = held.value
    host, port = env.host_api.rsplit(":", 1)

    @given(requests(identifier))
    def check(request: tuple[str, str, dict[str, str], bytes]) -> None:
        method, path, headers, body = request
        if method == "GET" and path.partition("?")[0] in LONG_POLLS:
            return
        assert_well_formed(exchange((host, int(port)), raw_request(method, path, headers, body)))

    check()


def test_the_environment_still_serves_after_the_fuzz(live: tuple[Background, Recorder, str]) -> None:
    held, recorder, _ = live
    env: Environment = held.value

    async def invoke_twice() -> list[Any]:
        return [await env.invoke(json.dumps({"n": n}).encode(), request_id=str(uuid.uuid4())) for n in range(2)]

    results = held.run(invoke_twice())
    for result in results:  # (an error the fuzz made the extension or the runtime post may have reset it: Init again)
        assert isinstance(result.outcome, Response | LambdaFailure)
        assert isinstance(result.outcome, Response), result.outcome
    reports = [r["requestId"] for r in recorder.records("platform.report")]
    assert all(reports.count(r.request_id) == 1 for r in results)  # one outcome, one report, each


# ---- during an invoke: random answers for the invoke in flight, raced against the runtime's own --------------------


@dataclass
class Starts:
    """An observer: an Event per request id, set when the invoke's platform.start is emitted."""

    started: dict[str, threading.Event] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)

    def __call__(self, event: TelemetryEvent) -> None:
        if event.type == "platform.start":
            self.started.setdefault(event.record["requestId"], threading.Event()).set()
        elif event.type == "platform.report":
            self.reports.append(event.record["requestId"])

    def wait(self, request_id: str) -> None:
        assert self.started.setdefault(request_id, threading.Event()).wait(30), f"{request_id} never started"


@contextlib.asynccontextmanager
async def _sleeping(tmp_path: Path, starts: Starts) -> AsyncIterator[Environment]:
    config = make_function(tmp_path, "handler.sleep", timeout_s=10)
    async with open_environment(config, observers=[starts]) as env:
        yield env


@pytest.fixture(scope="module")
def sleeping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Background, Starts]]:
    starts = Starts()
    with background(lambda: _sleeping(tmp_path_factory.mktemp("fuzz-invoke-in-flight"), starts)) as held:
        yield held, starts


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    kind = draw(st.sampled_from(["response", "error", "response", "x"]))
    method = "POST" if draw(st.integers(0, 5)) else draw(methods)
    names = draw(st.lists(st.sampled_from(HEADERS), unique=True, max_size=3))
    headers = {name: draw(header_text) for name in names if name not in ("Transfer-Encoding", "Expect")}
    return method, kind, headers, draw(bodies)


def test_fuzz_answers_to_the_invoke_in_flight_end_it_once(sleeping: tuple[Background, Starts]) -> None:
    """Each example: an invoke whose handler sleeps 50 ms; a random answer for its request id races the runtime's.
    A 202 means that answer is the outcome; otherwise the handler's is. Either way, one outcome and one report."""
    held, starts = sleeping
    env: Environment = held.value
    host, port = env.host_api.rsplit(":", 1)

    @given(answers())
    def check(answer: tuple[str, str, dict[str, str], bytes]) -> None:
        method, kind, headers, body = answer
        request_id = str(uuid.uuid4())
        invoke = asyncio.run_coroutine_threadsafe(env.invoke(b'{"seconds": 0.05}', request_id=request_id), held.loop)
        starts.wait(request_id)
        path = f"{RUNTIME}/invocation/{request_id}/{kind}"
        got = exchange((host, int(port)), raw_request(method, path, headers, body))
        assert_well_formed(got)
        result = invoke.result(30)
        if got.status == 202 and kind == "response":
            assert isinstance(result.outcome, Response) and result.outcome.body == body
        elif got.status == 202:
            assert isinstance(result.outcome, FunctionFailure | LambdaFailure)
        else:
            assert isinstance(result.outcome, Response) and json.loads(result.outcome.body) == "slept"
        assert starts.reports.count(request_id) == 1

    check()
