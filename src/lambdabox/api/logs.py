"""The Logs API ``2020-08-15`` (superseded by the Telemetry API): ``PUT /2020-08-15/logs`` subscribes an extension
to platform, function and extension logs in the older record shapes."""

from __future__ import annotations

import functools

from lambdabox.api.extensions import IDENTIFIER
from lambdabox.api.httpserver import Request, Response, Router, json_response, read_json
from lambdabox.api.telemetry import Subscriptions
from lambdabox.core.telemetry import ERROR_TYPE, LOGS, parse_logs_subscription

PATH = "/2020-08-15/logs"


async def subscribe(subscriptions: Subscriptions, request: Request) -> Response:
    name = subscriptions.extension_name(request.header(IDENTIFIER))
    subscriptions.subscribe(name, parse_logs_subscription(read_json(request, ERROR_TYPE[LOGS])))
    return json_response("OK")  # 200, not 202: the samples read 202 as "not supported, running locally?"


def add_routes(router: Router, subscriptions: Subscriptions) -> None:
    router.add("PUT", PATH, functools.partial(subscribe, subscriptions))
