"""The Extensions API ``2020-01-01``: register, the /event/next long-poll, init and exit errors."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from lambdabox.api.render import read_json
from lambdabox.api.shell import SHELL
from lambdabox.core.errors import ApiError
from lambdabox.core.facts import ExtensionErrorPosted, ExtensionRegistered, ExtensionRequestedNext

PREFIX = "/2020-01-01/extension"
NAME = "Lambda-Extension-Name"
IDENTIFIER = "Lambda-Extension-Identifier"
ACCEPT_FEATURE = "Lambda-Extension-Accept-Feature"
ERROR_TYPE = "Lambda-Extension-Function-Error-Type"


async def register(request: web.Request) -> web.Response:
    shell = request.app[SHELL]
    events = _events(await read_json(request, "InvalidRequestFormat"))
    identifier = str(uuid.uuid4())
    shell.submit(ExtensionRegistered(request.headers.get(NAME, ""), events, identifier))
    config = shell.config
    body: dict[str, Any] = {"functionName": config.function_name, "functionVersion": config.version}
    body["handler"] = config.handler
    features = {f.strip() for f in request.headers.get(ACCEPT_FEATURE, "").split(",")}
    if "accountId" in features:
        body["accountId"] = config.account_id
    return web.json_response(body, headers={IDENTIFIER: identifier})


async def next_event(request: web.Request) -> web.Response:
    identifier = request.headers.get(IDENTIFIER)
    event = await request.app[SHELL].extension_next(ExtensionRequestedNext(identifier))
    return web.json_response(event, headers={IDENTIFIER: identifier or ""})


async def init_error(request: web.Request) -> web.Response:
    return await _post_error(request, "init")


async def exit_error(request: web.Request) -> web.Response:
    return await _post_error(request, "exit")


async def _post_error(request: web.Request, phase: str) -> web.Response:
    error_type = request.headers.get(ERROR_TYPE)
    if not error_type:
        raise ApiError(400, "InvalidRequestFormat", f"{ERROR_TYPE} header is required")
    body = await read_json(request, "InvalidRequestFormat")
    message = body.get("errorMessage", "") if isinstance(body, dict) else ""
    fact = ExtensionErrorPosted(request.headers.get(IDENTIFIER), error_type, phase, str(message))
    request.app[SHELL].submit(fact)
    return web.json_response({"status": "OK"}, status=202)


def _events(body: object) -> tuple[str, ...]:
    events = body.get("events", []) if isinstance(body, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ApiError(400, "InvalidRequestFormat", 'body must be {"events": [...]} with INVOKE and/or SHUTDOWN')
    return tuple(events)


def routes() -> list[web.RouteDef]:
    return [
        web.post(f"{PREFIX}/register", register),
        web.get(f"{PREFIX}/event/next", next_event),
        web.post(f"{PREFIX}/init/error", init_error),
        web.post(f"{PREFIX}/exit/error", exit_error),
    ]
