"""The Runtime API ``2018-06-01``: the runtime's /next long-poll and its response, error and init-error posts."""

from __future__ import annotations

import json

from aiohttp import web

from lambdabox.api.shell import SHELL
from lambdabox.core.errors import ApiError
from lambdabox.core.facts import ErrorPosted, InitErrorPosted, ResponsePosted, RuntimeRequestedNext

PREFIX = "/2018-06-01/runtime"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
ACCEPTED = {"status": "OK"}


async def next_invocation(request: web.Request) -> web.Response:
    invoke, deadline = await request.app[SHELL].runtime_next(RuntimeRequestedNext())
    headers = {
        "Lambda-Runtime-Aws-Request-Id": invoke.request_id,
        "Lambda-Runtime-Deadline-Ms": str(int(deadline * 1000)),
        "Lambda-Runtime-Invoked-Function-Arn": invoke.invoked_function_arn,
        "Lambda-Runtime-Trace-Id": invoke.trace_id,
    }
    if invoke.client_context is not None:
        headers["Lambda-Runtime-Client-Context"] = invoke.client_context
    if invoke.cognito_identity is not None:
        headers["Lambda-Runtime-Cognito-Identity"] = invoke.cognito_identity
    return web.Response(body=invoke.payload, headers=headers, content_type="application/json")


async def post_response(request: web.Request) -> web.Response:
    shell = request.app[SHELL]
    request_id = request.match_info["request_id"]
    first_byte_at = shell.now()
    try:
        body = await _read_limited(request)
    except ApiError:
        failure = _error_json("Function.ResponseSizeTooLarge", _too_large_message())
        shell.submit(ErrorPosted(request_id, "Function.ResponseSizeTooLarge", failure))
        raise
    content_type = request.headers.get("Content-Type", "application/json")
    shell.submit(ResponsePosted(request_id, body, content_type, first_byte_at))
    return web.json_response(ACCEPTED, status=202)


async def post_error(request: web.Request) -> web.Response:
    body, error_type = await _error_request(request)
    request.app[SHELL].submit(ErrorPosted(request.match_info["request_id"], error_type, body))
    return web.json_response(ACCEPTED, status=202)


async def post_init_error(request: web.Request) -> web.Response:
    body, error_type = await _error_request(request)
    request.app[SHELL].submit(InitErrorPosted(error_type, body))
    return web.json_response(ACCEPTED, status=202)


async def _read_limited(request: web.Request) -> bytes:
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise ApiError(413, "RequestEntityTooLarge", _too_large_message())
    return bytes(body)


def _too_large_message() -> str:
    return f"Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."


def _error_json(error_type: str, message: str) -> bytes:
    return json.dumps({"errorMessage": message, "errorType": error_type}).encode()


async def _error_request(request: web.Request) -> tuple[bytes, str]:
    """The ErrorRequest as posted, and its type: the header wins, then the body's errorType (as Lambda does)."""
    raw = await _read_limited(request)
    header = request.headers.get(ERROR_TYPE_HEADER)
    try:
        parsed = json.loads(raw) if raw.strip() else {}
    except ValueError:
        parsed = {}
    body_type = parsed.get("errorType") if isinstance(parsed, dict) else None
    error_type = header or (body_type if isinstance(body_type, str) else None) or "Runtime.Unknown"
    if not isinstance(parsed, dict) or not parsed:
        return _error_json(error_type, raw.decode("utf-8", "replace")), error_type
    return raw, error_type


def routes() -> list[web.RouteDef]:
    return [
        web.get(f"{PREFIX}/invocation/next", next_invocation),
        web.post(f"{PREFIX}/invocation/{{request_id}}/response", post_response),
        web.post(f"{PREFIX}/invocation/{{request_id}}/error", post_error),
        web.post(f"{PREFIX}/init/error", post_init_error),
    ]
