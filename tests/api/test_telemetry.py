"""The Logs and Telemetry API handlers over real HTTP: 200 "OK", Lambda's error bodies, the identifier check, and
subscriptions closing with Init. The shell is a small stand-in built on a real TelemetryHub."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from lambdabox.api import logs as logs_api
from lambdabox.api import telemetry as telemetry_api
from lambdabox.api.httpserver import HttpServer, Router
from lambdabox.core.errors import ApiError
from lambdabox.core.telemetry import Subscription
from lambdabox.environment.delivery import TelemetryHub
from lambdabox.environment.report import TelemetryEvent
from support import run

T0 = 1_700_000_000.0
ID = "9c4f1e9e-0000-4000-8000-000000000001"
TELEMETRY = "/2022-07-01/telemetry"
LOGS = "/2020-08-15/logs"
DESTINATION = {"protocol": "HTTP", "URI": "http://sandbox.localdomain:4243/"}


@dataclass
class Shell:
    """What the environment provides: names for identifiers, and subscribe = hub.subscribe + emit its record."""

    hub: TelemetryHub
    names: dict[str, str] = field(default_factory=lambda: {ID: "my-ext"})
    emitted: list[TelemetryEvent] = field(default_factory=list)

    def extension_name(self, identifier: str | None) -> str:
        if identifier not in self.names:
            raise ApiError(
                403, "Extension.UnknownExtensionIdentifier", "missing or unknown Lambda-Extension-Identifier"
            )
        return self.names[identifier]

    def subscribe(self, extension_name: str, subscription: Subscription) -> None:
        emitted = self.hub.subscribe(extension_name, subscription)
        if emitted is not None:
            event = TelemetryEvent(T0, *emitted)
            self.emitted.append(event)
            self.hub.observe(event)


@contextlib.asynccontextmanager
async def open_client() -> AsyncIterator[tuple[aiohttp.ClientSession, Shell]]:
    hub = TelemetryHub()
    shell = Shell(hub)
    router = Router()
    logs_api.add_routes(router, shell)
    telemetry_api.add_routes(router, shell)
    server = HttpServer(router)
    host, port = await server.listen("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as client:
            yield client, shell
    finally:
        await server.close()
        await hub.close()


async def put(client: aiohttp.ClientSession, path: str, body: Any, **headers: str) -> Any:
    headers.setdefault("Lambda-Extension-Identifier", ID)
    payload: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with client.put(path, headers=headers, **payload) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.json()


def test_telemetry_subscription_answers_200_ok() -> None:
    async def scenario() -> None:
        async with open_client() as (client, shell):
            body = {"schemaVersion": "2022-12-13", "types": ["platform"], "destination": DESTINATION}
            assert await put(client, TELEMETRY, body) == (200, "application/json", "OK")
            assert [(e.type, e.record) for e in shell.emitted] == [
                ("platform.telemetrySubscription", {"name": "my-ext", "state": "Subscribed", "types": ["platform"]})
            ]
            assert (await put(client, TELEMETRY, body))[:1] == (200,)  # again: idempotent, nothing new emitted
            assert len(shell.emitted) == 1

    run(scenario())


def test_logs_subscription_answers_200_ok() -> None:
    async def scenario() -> None:
        async with open_client() as (client, shell):
            body = {"types": ["platform", "function"], "destination": {"protocol": "TCP", "port": 4244}}
            assert (await put(client, LOGS, body))[::2] == (200, "OK")
            assert shell.emitted[0].type == "platform.logsSubscription"

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
        async with open_client() as (client, shell):
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
            assert shell.emitted == []

    run(scenario())


def test_subscribing_after_init_is_refused() -> None:
    async def scenario() -> None:
        async with open_client() as (client, shell):
            shell.hub.observe(TelemetryEvent(T0, "platform.initReport", {"phase": "init", "status": "success"}))
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
