"""The Lambda Invoke API ``2015-03-31`` (CONTRACT.md section 6): validate, hand to the server, await, render; and
the one place that renders its service errors (``x-amzn-ErrorType`` and a ``{"Type", "message"}`` body).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import resource
import uuid
from dataclasses import dataclass

from lambdabox.api.httpserver import Limits, Request, Router, json_response
from lambdabox.api.httpserver import Response as HttpResponse
from lambdabox.api.ports import Answer, Invoker
from lambdabox.core import jsontext
from lambdabox.core.errors import ApiError, ErrorType, LambdaboxError, Throttled, error_body
from lambdabox.core.model import (
    DEFAULT_ACCOUNT_ID,
    DEFAULT_REGION,
    LATEST,
    FunctionConfig,
    FunctionFailure,
    LambdaFailure,
    Response,
)

PATH = "/2015-03-31/functions/{name}/invocations"
EMULATOR_NAME = "function"  # AWS's runtime interface emulator serves /2015-03-31/functions/function/invocations
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
EVENT_PAYLOAD_LIMIT = 1024 * 1024
CLIENT_CONTEXT_LIMIT = 3583
INVOCATION_TYPES = ("DryRun", "RequestResponse", "Event")  # in the order of Lambda's message
LOG_TYPES = ("Tail", "None")
REQUEST_ID = "x-amzn-RequestId"

_FUNCTION_NAME = re.compile(
    r"(?:arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z]{2}(?:-gov)?-[a-z]+-\d):)?(?:(?P<account>\d{12}):)?(?:function:)?"
    r"(?P<name>[a-zA-Z0-9_.-]+)(?::(?P<qualifier>\$LATEST|[a-zA-Z0-9_-]+))?"
)
_VERSION = re.compile(r"\d+")


@dataclass(frozen=True)
class FunctionName:
    """A FunctionName as the Invoke API takes it: a name, a partial ARN or an ARN, with an optional qualifier."""

    name: str
    qualifier: str | None = None
    region: str | None = None
    account: str | None = None

    def matches(self, config: FunctionConfig) -> bool:
        return self.region in (None, config.region) and self.account in (None, config.account_id)

    def arn(self) -> str:
        region, account = self.region or DEFAULT_REGION, self.account or DEFAULT_ACCOUNT_ID
        return f"arn:aws:lambda:{region}:{account}:function:{self.name}"


def function_name(text: str) -> FunctionName | None:
    match = _FUNCTION_NAME.fullmatch(text)
    if match is None:
        return None
    return FunctionName(match["name"], match["qualifier"], match["region"], match["account"])


@dataclass(frozen=True)
class Call:
    """A validated Invoke request, before its payload is read."""

    config: FunctionConfig
    invoked_arn: str
    invocation_type: str
    tail: bool
    client_context: str | None


async def invoke(invoker: Invoker, request: Request) -> HttpResponse:
    call = validate(request, invoker)
    payload = read_payload(request, EVENT_PAYLOAD_LIMIT if call.invocation_type == "Event" else SYNC_PAYLOAD_LIMIT)
    if call.invocation_type == "DryRun":
        return HttpResponse(204, headers={REQUEST_ID: str(uuid.uuid4())})
    if call.invocation_type == "Event":
        return HttpResponse(202, headers={REQUEST_ID: invoker.enqueue(call.config, payload)})
    answer = await invoker.invoke(
        call.config, payload, client_context=call.client_context, invoked_arn=call.invoked_arn, tail=call.tail
    )
    return render_answer(answer)


def validate(request: Request, invoker: Invoker) -> Call:
    """The function (404 if none), the qualifier, and the invocation headers (400 if bad)."""
    text = request.params["name"]
    parsed = function_name(text)
    if parsed is None:
        raise ApiError(400, ErrorType.VALIDATION, f"1 validation error detected: Value '{text}' at 'functionName' "
                       "failed to satisfy constraint: Member must satisfy the function name pattern")  # fmt: skip
    qualifier = parsed.qualifier
    if (query := request.query.get("Qualifier")) is not None:
        if qualifier is not None and query != qualifier:
            message = "The derived qualifier from the function name does not match the specified qualifier."
            raise ApiError(400, ErrorType.INVALID_PARAMETER_VALUE, message)
        qualifier = query
    config = invoker.function(parsed.name)
    suffix = f":{qualifier}" if qualifier else ""
    if config is None or not parsed.matches(config) or (qualifier is not None and not _alias_or_latest(qualifier)):
        raise ApiError(404, ErrorType.RESOURCE_NOT_FOUND, f"Function not found: {parsed.arn()}{suffix}")
    kind = request.headers.get("x-amz-invocation-type", "RequestResponse")  # (sent empty, it is invalid)
    if kind not in INVOCATION_TYPES:
        raise _invalid("invocationType", kind, INVOCATION_TYPES)
    log_type = request.headers.get("x-amz-log-type", "None")
    if log_type not in LOG_TYPES:
        raise _invalid("logType", log_type, LOG_TYPES)
    context = client_context(request.header("X-Amz-Client-Context"))
    sync = kind == "RequestResponse"  # Lambda passes the client context, and tails the log, for these only
    return Call(config, config.arn + suffix, kind, sync and log_type == "Tail", context if sync else None)


def client_context(header: str | None) -> str | None:
    """The base64 JSON object of ``X-Amz-Client-Context`` as the JSON text the runtime gets, or ApiError 400."""
    if header is None:
        return None
    if len(header) > CLIENT_CONTEXT_LIMIT:
        message = f"Client context must be at most {CLIENT_CONTEXT_LIMIT} bytes of base64-encoded data."
        raise ApiError(400, ErrorType.INVALID_PARAMETER_VALUE, message)
    try:
        value = json.loads(base64.b64decode(header, validate=True))
    except (binascii.Error, ValueError):
        value = None
    if not isinstance(value, dict):
        message = "Client context must be a valid Base64-encoded JSON object."
        raise ApiError(400, ErrorType.INVALID_REQUEST_CONTENT, message)
    return json.dumps(value, separators=(",", ":"))


def read_payload(request: Request, limit: int) -> bytes:
    """The body within its limit (413 beyond it), checked to be JSON (400); an empty body is ``{}``."""
    body = request.body
    if request.oversize or len(body) > limit:
        message = f"Request must be smaller than {limit} bytes for the Invoke operation"
        raise ApiError(413, ErrorType.REQUEST_TOO_LARGE, message)
    if not body.strip():
        return b"{}"
    try:
        jsontext.loads(body)
    except ValueError as error:
        message = f"Could not parse request body into json: {error}"
        raise ApiError(400, ErrorType.INVALID_REQUEST_CONTENT, message) from None
    return body


def render_answer(answer: Answer) -> HttpResponse:
    headers = {REQUEST_ID: answer.request_id, "X-Amz-Executed-Version": LATEST}
    if answer.log_result is not None:
        headers["X-Amz-Log-Result"] = answer.log_result
    match answer.outcome:
        case Response(body=body, content_type=content_type):
            return HttpResponse(200, body, headers, content_type)
        case FunctionFailure(body=body):
            headers["X-Amz-Function-Error"] = "Unhandled"
            return HttpResponse(200, body, headers)
        case LambdaFailure(error_type=error_type, message=message):
            headers["X-Amz-Function-Error"] = "Unhandled"
            return HttpResponse(200, error_body(error_type, message), headers)


def service_error(error: ApiError) -> HttpResponse:
    """A refusal as the SDKs parse it: the type in ``x-amzn-ErrorType``, ``{"Type", "message"[, "Reason"]}``; a
    ValidationException (the API's own input validation) has a ``message`` alone, as Lambda's (ex-aws/ex_aws#442)."""
    body = {"message": error.message}
    if error.error_type != ErrorType.VALIDATION:
        body = {"Type": "Service" if error.status >= 500 else "User", **body}
    if isinstance(error, Throttled):
        body["Reason"] = error.reason
    headers = {"x-amzn-ErrorType": error.error_type, REQUEST_ID: str(uuid.uuid4())}
    return json_response(body, error.status, headers)


async def answer(invoker: Invoker, request: Request) -> HttpResponse:
    """``invoke``, with every refusal and failure rendered as a service error."""
    try:
        return await invoke(invoker, request)
    except ApiError as error:
        return service_error(error)
    except LambdaboxError as error:  # e.g. a layer refused when an environment starts (the pool reported it)
        return service_error(ApiError(500, ErrorType.SERVICE, str(error)))
    except Exception as error:
        invoker.report(f"lambdabox: the Invoke API failed: {error!r}")
        return service_error(ApiError(500, ErrorType.SERVICE, f"lambdabox failed: {error!r}"))


_REFUSAL_TYPES = {
    408: ErrorType.REQUEST_TIMEOUT,
    413: ErrorType.REQUEST_TOO_LARGE,
    429: ErrorType.TOO_MANY_REQUESTS,
    431: ErrorType.REQUEST_TOO_LARGE,
}


def refusal(status: int, message: str) -> HttpResponse:
    """A request refused before it is read whole (too large, too slow, too many connections) as a service error."""
    return service_error(ApiError(status, _REFUSAL_TYPES.get(status, ErrorType.INVALID_REQUEST_CONTENT), message))


def limits() -> Limits:
    """The Invoke API's limits on its clients: a request sent whole within 60 s, a connection idle for 60 s closed
    (as load balancers in front of AWS endpoints do; the SDKs reconnect), and connections capped at a quarter of
    the descriptors lambdabox may open (at most 1,024), leaving the rest to its environments."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = 1024 if soft == resource.RLIM_INFINITY else max(64, min(1024, soft // 4))
    return Limits(max_connections=cap, request_timeout_s=60.0, idle_timeout_s=60.0, refuse=refusal)


def add_routes(router: Router, invoker: Invoker) -> None:
    router.add("POST", PATH, functools.partial(answer, invoker))


def _alias_or_latest(qualifier: str) -> bool:
    """Only $LATEST exists locally; an alias name is taken to point at it, a version number is not found."""
    return qualifier == LATEST or not _VERSION.fullmatch(qualifier)


def _invalid(member: str, value: str, allowed: tuple[str, ...]) -> ApiError:
    """Lambda's answer to a header outside its enum, as Lambda words it (seen in ex-aws/ex_aws#442)."""
    message = (f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy constraint: "
               f"Member must satisfy enum value set: [{', '.join(allowed)}]")  # fmt: skip
    return ApiError(400, ErrorType.VALIDATION, message)
