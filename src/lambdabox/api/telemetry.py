"""The Telemetry API ``2022-07-01`` (``PUT /2022-07-01/telemetry``) and the handler both subscription APIs share: the
body is handed to the core as a fact, which applies Lambda's rules (:mod:`lambdabox.core.subscriptions`)."""

from __future__ import annotations

import functools

from lambdabox.api.extensions import IDENTIFIER
from lambdabox.api.httpserver import Request, Response, Router, json_response, read_json
from lambdabox.api.ports import EnvironmentPort
from lambdabox.core.facts import SubscriptionRequested
from lambdabox.core.telemetry import ERROR_TYPE, TELEMETRY

PATH = "/2022-07-01/telemetry"


async def subscribe(api: str, port: EnvironmentPort, request: Request) -> Response:
    """A subscription through ``api`` (the Logs or the Telemetry API): both are answered alike."""
    body = read_json(request, ERROR_TYPE[api])
    port.submit(SubscriptionRequested(api, request.header(IDENTIFIER), body))
    return json_response("OK")  # 200, not 202: the samples read 202 as "not supported, running locally?"


def add_routes(router: Router, port: EnvironmentPort) -> None:
    router.add("PUT", PATH, functools.partial(subscribe, TELEMETRY, port))
