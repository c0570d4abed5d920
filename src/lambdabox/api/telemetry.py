"""The Telemetry API ``2022-07-01``: ``PUT /2022-07-01/telemetry`` subscribes an extension to platform, function
and extension records; also what both subscription APIs need from the environment (:class:`Subscriptions`)."""

from __future__ import annotations

import functools
from typing import Protocol

from lambdabox.api.extensions import IDENTIFIER
from lambdabox.api.httpserver import Request, Response, Router, json_response, read_json
from lambdabox.core.telemetry import (
    ERROR_TYPE,
    TELEMETRY,
    Subscription,
    parse_logs_subscription,
    parse_telemetry_subscription,
)

PATH = "/2022-07-01/telemetry"


class Subscriptions(Protocol):
    def extension_name(self, identifier: str | None) -> str:
        """The registered extension's name, or ApiError 403 ``Extension.UnknownExtensionIdentifier``."""

    def subscribe(self, extension_name: str, subscription: Subscription) -> None:
        """Subscribe and emit its ``platform.*Subscription`` record; ApiError when Lambda would refuse it
        (403 after Init, 400 when the extension already uses the other API)."""


async def subscribe(api: str, subscriptions: Subscriptions, request: Request) -> Response:
    """A subscription through ``api`` (the Logs or the Telemetry API): both are answered alike."""
    name = subscriptions.extension_name(request.header(IDENTIFIER))
    parse = parse_telemetry_subscription if api == TELEMETRY else parse_logs_subscription
    subscriptions.subscribe(name, parse(read_json(request, ERROR_TYPE[api])))
    return json_response("OK")  # 200, not 202: the samples read 202 as "not supported, running locally?"


def add_routes(router: Router, subscriptions: Subscriptions) -> None:
    router.add("PUT", PATH, functools.partial(subscribe, TELEMETRY, subscriptions))
