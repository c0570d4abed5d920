"""The Runtime API ``2018-06-01``: the runtime's /next long-poll and its response, error and init-error posts."""

from __future__ import annotations

import functools

from lambdabox.api.httpserver import Request, Response, Router, json_response
from lambdabox.api.ports import EnvironmentPort
from lambdabox.core import jsontext
from lambdabox.core.errors import ApiError, ErrorType, error_body
from lambdabox.core.facts import ErrorPosted, InitErrorPosted, ResponsePosted, RuntimeRequestedNext

PREFIX = "/2018-06-01/runtime"
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
ACCEPTED = {"status": "OK"}


async def next_invocation(port: EnvironmentPort, request: Request) -> Response:
    invoke, deadline = await port.runtime_next(RuntimeRequestedNext())
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
    return Response(200, invoke.payload, headers)


async def post_response(port: EnvironmentPort, request: Request) -> Response:
    request_id = request.params["request_id"]
    first_byte_at = port.now()  # the whole body is in: the runtime began sending it no later than now
    try:
        body = _read_limited(request)
    except ApiError:
        failure = error_body(ErrorType.RESPONSE_SIZE_TOO_LARGE, _too_large_message())
        port.submit(ErrorPosted(request_id, ErrorType.RESPONSE_SIZE_TOO_LARGE, failure))
        raise
    content_type = request.header("Content-Type") or "application/json"
    port.submit(ResponsePosted(request_id, body, content_type, first_byte_at))
    return json_response(ACCEPTED, status=202)


async def post_error(port: EnvironmentPort, request: Request) -> Response:
    body, error_type = _error_request(request)
    port.submit(ErrorPosted(request.params["request_id"], error_type, body))
    return json_response(ACCEPTED, status=202)


async def post_init_error(port: EnvironmentPort, request: Request) -> Response:
    body, error_type = _error_request(request)
    port.submit(InitErrorPosted(error_type, body))
    return json_response(ACCEPTED, status=202)


def _read_limited(request: Request) -> bytes:
    if request.oversize or len(request.body) > MAX_RESPONSE_BYTES:
        raise ApiError(413, ErrorType.REQUEST_ENTITY_TOO_LARGE, _too_large_message())
    return request.body


def _too_large_message() -> str:
    return f"Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."


def _error_request(request: Request) -> tuple[bytes, str]:
    """The ErrorRequest as posted, and its type: the header wins, then the body's errorType (as Lambda does)."""
    raw = _read_limited(request)
    header = request.header(ERROR_TYPE_HEADER)
    try:
        parsed = jsontext.loads(raw) if raw.strip() else {}
    except ValueError:
        parsed = {}
    body_type = parsed.get("errorType") if isinstance(parsed, dict) else None
    error_type = header or (body_type if isinstance(body_type, str) else None) or ErrorType.RUNTIME_UNKNOWN
    if not isinstance(parsed, dict) or not parsed:
        return error_body(error_type, raw.decode("utf-8", "replace")), error_type
    return raw, error_type


def add_routes(router: Router, port: EnvironmentPort) -> None:
    router.add("GET", f"{PREFIX}/invocation/next", functools.partial(next_invocation, port))
    router.add("POST", f"{PREFIX}/invocation/{{request_id}}/response", functools.partial(post_response, port))
    router.add("POST", f"{PREFIX}/invocation/{{request_id}}/error", functools.partial(post_error, port))
    router.add("POST", f"{PREFIX}/init/error", functools.partial(post_init_error, port))
