"""The Extensions API ``2020-01-01``: register, the /event/next long-poll, init and exit errors."""

from __future__ import annotations

import functools
import uuid
from typing import Any

from lambdabox.api.httpserver import Request, Response, Router, json_response, read_json
from lambdabox.api.ports import Shell
from lambdabox.core.errors import ApiError
from lambdabox.core.facts import ExtensionErrorPosted, ExtensionRegistered, ExtensionRequestedNext

PREFIX = "/2020-01-01/extension"
NAME = "Lambda-Extension-Name"
IDENTIFIER = "Lambda-Extension-Identifier"
ACCEPT_FEATURE = "Lambda-Extension-Accept-Feature"
ERROR_TYPE = "Lambda-Extension-Function-Error-Type"


async def register(shell: Shell, request: Request) -> Response:
    events = _events(read_json(request, "InvalidRequestFormat"))
    identifier = str(uuid.uuid4())
    shell.submit(ExtensionRegistered(request.header(NAME) or "", events, identifier))
    config = shell.config
    body: dict[str, Any] = {"functionName": config.function_name, "functionVersion": config.version}
    body["handler"] = config.handler
    features = {f.strip() for f in (request.header(ACCEPT_FEATURE) or "").split(",")}
    if "accountId" in features:
        body["accountId"] = config.account_id
    return json_response(body, headers={IDENTIFIER: identifier})


async def next_event(shell: Shell, request: Request) -> Response:
    identifier = request.header(IDENTIFIER)
    event = await shell.extension_next(ExtensionRequestedNext(identifier))
    return json_response(event, headers={IDENTIFIER: identifier or ""})


async def post_error(phase: str, shell: Shell, request: Request) -> Response:
    """``/init/error`` and ``/exit/error``."""
    error_type = request.header(ERROR_TYPE)
    if not error_type:
        raise ApiError(400, "InvalidRequestFormat", f"{ERROR_TYPE} header is required")
    body = read_json(request, "InvalidRequestFormat")
    message = body.get("errorMessage", "") if isinstance(body, dict) else ""
    shell.submit(ExtensionErrorPosted(request.header(IDENTIFIER), error_type, phase, str(message)))
    return json_response({"status": "OK"}, status=202)


def _events(body: object) -> tuple[str, ...]:
    events = body.get("events", []) if isinstance(body, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ApiError(400, "InvalidRequestFormat", 'body must be {"events": [...]} with INVOKE and/or SHUTDOWN')
    return tuple(events)


def add_routes(router: Router, shell: Shell) -> None:
    router.add("POST", f"{PREFIX}/register", functools.partial(register, shell))
    router.add("GET", f"{PREFIX}/event/next", functools.partial(next_event, shell))
    router.add("POST", f"{PREFIX}/init/error", functools.partial(post_error, "init", shell))
    router.add("POST", f"{PREFIX}/exit/error", functools.partial(post_error, "exit", shell))
