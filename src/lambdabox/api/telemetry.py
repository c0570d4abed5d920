"""The Telemetry API ``2022-07-01``: ``PUT /2022-07-01/telemetry`` subscribes an extension to platform, function
and extension records; also what both subscription APIs need from the environment (:class:`Subscriptions`)."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from lambdabox.api.extensions import IDENTIFIER
from lambdabox.api.render import read_json
from lambdabox.core.telemetry import ERROR_TYPE, TELEMETRY, Subscription, parse_telemetry_subscription

PATH = "/2022-07-01/telemetry"


class Subscriptions(Protocol):
    def extension_name(self, identifier: str | None) -> str:
        """The registered extension's name, or ApiError 403 ``Extension.UnknownExtensionIdentifier``."""

    def subscribe(self, extension_name: str, subscription: Subscription) -> None:
        """Subscribe and emit its ``platform.*Subscription`` record; ApiError when Lambda would refuse it
        (403 after Init, 400 when the extension already uses the other API)."""


SUBSCRIPTIONS = web.AppKey("subscriptions", Subscriptions)


async def subscribe(request: web.Request) -> web.Response:
    subscriptions = request.app[SUBSCRIPTIONS]
    name = subscriptions.extension_name(request.headers.get(IDENTIFIER))
    subscriptions.subscribe(name, parse_telemetry_subscription(await read_json(request, ERROR_TYPE[TELEMETRY])))
    return web.json_response("OK")  # 200, not 202: the samples read 202 as "not supported, running locally?"


def routes() -> list[web.RouteDef]:
    return [web.put(PATH, subscribe)]
