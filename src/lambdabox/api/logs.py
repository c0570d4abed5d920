"""The Logs API ``2020-08-15`` (superseded by the Telemetry API): ``PUT /2020-08-15/logs`` subscribes an extension
to platform, function and extension logs in the older record shapes."""

from __future__ import annotations

from aiohttp import web

from lambdabox.api.extensions import IDENTIFIER
from lambdabox.api.render import read_json
from lambdabox.api.telemetry import SUBSCRIPTIONS
from lambdabox.core.telemetry import ERROR_TYPE, LOGS, parse_logs_subscription

PATH = "/2020-08-15/logs"


async def subscribe(request: web.Request) -> web.Response:
    subscriptions = request.app[SUBSCRIPTIONS]
    name = subscriptions.extension_name(request.headers.get(IDENTIFIER))
    subscriptions.subscribe(name, parse_logs_subscription(await read_json(request, ERROR_TYPE[LOGS])))
    return web.json_response("OK")  # 200, not 202: the samples read 202 as "not supported, running locally?"


def routes() -> list[web.RouteDef]:
    return [web.put(PATH, subscribe)]
