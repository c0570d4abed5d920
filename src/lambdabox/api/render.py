"""Renders every API refusal the way Lambda does: ``{"errorMessage", "errorType"}`` with the error's status."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from lambdabox.core.errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: ApiError) -> web.Response:
    body = {"errorMessage": error.message, "errorType": error.error_type}
    return web.json_response(body, status=error.status)


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns an ApiError raised by any handler (or by the core it called) into Lambda's error response."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error)


async def read_json(request: web.Request, error_type: str) -> object:
    """The request body as JSON, or ApiError 400 with ``error_type``; an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ApiError(400, error_type, f"request body is not valid JSON: {error}") from error
