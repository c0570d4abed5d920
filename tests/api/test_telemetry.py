"""The Logs and Telemetry API handlers over real HTTP: 200 "OK", Lambda's error bodies, the identifier check, and
subscriptions closing with Init. Behind them, a small stand-in for the environment feeds a real lifecycle core."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from lambdabox.api import logs as logs_api
from lambdabox.api import telemetry as telemetry_api
from lambdabox.api.httpserver import Router, open_http_server
from lambdabox.core.facts import (
    Command,
    EmitPlatformEvent,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    InitRequested,
    RuntimeRequestedNext,
    Subscribe,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.state import Settings
from support import run

T0 = 1_700_000_000.0
ID = "9c4f1e9e-0000-4000-8000-000000000001"
TELEMETRY = "/2022-07-01/telemetry"
LOGS = "/2020-08-15/logs"
DESTINATION = {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4243/"}


@dataclass
class Port:
    """What the environment provides the handlers: facts submitted to the core; here, an Init with "my-ext"
    registered, and the commands the core gave back kept."""

    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle(Settings("fn", "$LATEST", 3.0, ("my-ext",))))
    commands: list[Command] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.submit(InitRequested())
        self.submit(ExtensionRegistered("my-ext", (), ID))
        self.commands.clear()

    def now(self) -> float:
        return T0

    def submit(self, fact: Fact) -> None:
        self.commands.extend(self.lifecycle.handle(fact, T0))

    @property
    def emitted(self) -> list[tuple[str, Any]]:
        return [(c.type, c.record) for c in self.commands if isinstance(c, EmitPlatformEvent)]

    @property
    def subscribed(self) -> list[str]:
        return [c.extension for c in self.commands if isinstance(c, Subscribe)]

    def end_init(self) -> None:
        self.submit(RuntimeRequestedNext())
        self.submit(ExtensionRequestedNext(ID))
        self.commands.clear()


@contextlib.asynccontextmanager
async def open_client() -> AsyncIterator[tuple[aiohttp.ClientSession, Port]]:
    port = Port()
    router = Router()
    logs_api.add_routes(router, port)
    telemetry_api.add_routes(router, port)
    async with open_http_server(router) as server:
        host, number = await server.listen("127.0.0.1", 0)
        async with aiohttp.ClientSession(f"http://{host}:{number}") as client:
            yield client, port


async def put(client: aiohttp.ClientSession, path: str, body: Any, **headers: str) -> Any:
    headers.setdefault("Lambda-Extension-Identifier", ID)
    payload: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with client.put(path, headers=headers, **payload) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.json()


def test_telemetry_subscription_answers_200_ok() -> None:
    async def scenario() -> None:
        async with open_client() as (client, port):
            body = {"schemaVersion": "2022-12-13", "types": ["platform"], "destination": DESTINATION}
            assert await put(client, TELEMETRY, body) == (200, "application/json", "OK")
            assert port.emitted == [
                ("platform.telemetrySubscription", {"name": "my-ext", "state": "Subscribed", "types": ["platform"]})
            ]
            assert port.subscribed == ["my-ext"]
            assert (await put(client, TELEMETRY, body))[:1] == (200,)  # again: idempotent, nothing new emitted
            assert len(port.emitted) == 1 and port.subscribed == ["my-ext"]

    run(scenario())


def test_logs_subscription_answers_200_ok() -> None:
    async def scenario() -> None:
        async with open_client() as (client, port):
            body = {"types": ["platform", "function"], "destination": {"protocol": "TCP", "port": 4244}}
            assert (await put(client, LOGS, body))[::2] == (200, "OK")
            assert port.emitted[0][0] == "platform.logsSubscription"

    run(scenario())


def test_an_unknown_or_missing_identifier_is_forbidden() -> None:
    async def scenario() -> None:
        async with open_client() as (client, _):
            body = {"types": ["platform"], "destination": DESTINATION}
            for path in (TELEMETRY, LOGS):
                for identifier in ("not-registered", ""):
                    status, _, error = await put(client, path, body, **{"Lambda-Extension-Identifier": identifier})
                    assert (status, error["errorType"]) == (403, "Extension.UnknownExtensionIdentifier")

    run(scenario())


def test_validation_errors_have_each_apis_error_type() -> None:
    async def scenario() -> None:
        async with open_client() as (client, port):
            bad = {
                "schemaVersion": "2022-07-01",
                "types": [],
                "destination": {"protocol": "HTTP", "URI": "http://sandbox"},
            }
            assert await put(client, TELEMETRY, bad) == (
                400,
                "application/json",
                {"errorMessage": "types should not be empty; URI port is not provided", "errorType": "ValidationError"},
            )
            status, _, error = await put(client, LOGS, {**bad, "schemaVersion": "2020-08-15"})
            assert (status, error["errorType"]) == (400, "Logs.ValidationError")
            for path, error_type in ((TELEMETRY, "ValidationError"), (LOGS, "Logs.ValidationError")):
                status, _, error = await put(client, path, b"{not json")
                assert (status, error["errorType"]) == (400, error_type)
                status, _, error = await put(client, path, b"")
                assert (status, error["errorType"]) == (400, error_type)
            assert port.emitted == [] and port.subscribed == []

    run(scenario())


def test_subscribing_after_init_is_refused() -> None:
    async def scenario() -> None:
        async with open_client() as (client, port):
            port.end_init()
            body = {"schemaVersion": "2025-01-29", "types": ["function"], "destination": DESTINATION}
            assert await put(client, TELEMETRY, body) == (
                403,
                "application/json",
                {
                    "errorMessage": "Telemetry API subscription is closed already",
                    "errorType": "Telemetry.SubscriptionClosed",
                },
            )
            status, _, error = await put(client, LOGS, body | {"schemaVersion": "2021-03-18"})
            assert (status, error["errorType"]) == (403, "Logs.SubscriptionClosed")

    run(scenario())
