"""The Extensions API ``2020-01-01``: register, the /event/next long-poll, init and exit errors."""

from __future__ import annotations

import functools
import uuid
from typing import Any

from lambdabox.api.httpserver import Request, Response, Router, json_response, read_json
from lambdabox.api.ports import EnvironmentPort
from lambdabox.core.errors import ApiError, ErrorType
from lambdabox.core.facts import ExtensionErrorPosted, ExtensionRegistered, ExtensionRequestedNext

PREFIX = "/2020-01-01/extension"
NAME = "Lambda-Extension-Name"
IDENTIFIER = "Lambda-Extension-Identifier"
ACCEPT_FEATURE = "Lambda-Extension-Accept-Feature"
ERROR_TYPE = "Lambda-Extension-Function-Error-Type"


async def register(port: EnvironmentPort, request: Request) -> Response:
    events = _events(read_json(request, ErrorType.INVALID_REQUEST_FORMAT))
    identifier = str(uuid.uuid4())
    port.submit(ExtensionRegistered(request.header(NAME) or "", events, identifier))
    config = port.config
    body: dict[str, Any] = {"functionName": config.function_name, "functionVersion": config.version}
    body["handler"] = config.handler
    features = {f.strip() for f in (request.header(ACCEPT_FEATURE) or "").split(",")}
    if "accountId" in features:
        body["accountId"] = config.account_id
    return json_response(body, headers={IDENTIFIER: identifier})


async def next_event(port: EnvironmentPort, request: Request) -> Response:
    identifier = request.header(IDENTIFIER)
    event = await port.extension_next(ExtensionRequestedNext(identifier))
    return json_response(event, headers={IDENTIFIER: identifier or ""})


async def post_error(phase: str, port: EnvironmentPort, request: Request) -> Response:
    """``/init/error`` and ``/exit/error``."""
    error_type = request.header(ERROR_TYPE)
    if not error_type:
        raise ApiError(400, ErrorType.INVALID_REQUEST_FORMAT, f"{ERROR_TYPE} header is required")
    body = read_json(request, ErrorType.INVALID_REQUEST_FORMAT)
    message = body.get("errorMessage", "") if isinstance(body, dict) else ""
    port.submit(ExtensionErrorPosted(request.header(IDENTIFIER), error_type, phase, str(message)))
    return json_response({"status": "OK"}, status=202)


def _events(body: object) -> tuple[str, ...]:
    events = body.get("events", []) if isinstance(body, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ApiError(
            400, ErrorType.INVALID_REQUEST_FORMAT, 'body must be {"events": [...]} with INVOKE and/or SHUTDOWN'
        )
    return tuple(events)


def add_routes(router: Router, port: EnvironmentPort) -> None:
    router.add("POST", f"{PREFIX}/register", functools.partial(register, port))
    router.add("GET", f"{PREFIX}/event/next", functools.partial(next_event, port))
    router.add("POST", f"{PREFIX}/init/error", functools.partial(post_error, "init", port))
    router.add("POST", f"{PREFIX}/exit/error", functools.partial(post_error, "exit", port))
