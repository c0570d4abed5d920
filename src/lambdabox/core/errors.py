"""The one error tree of lambdabox, the one list of Lambda's error types, and the one renderer of error bodies.

LambdaboxError
├── ConfigError          bad template, layer or setting; refused before anything starts
│   ├── TemplateError    names the template file, the resource and the rule
│   └── LayerError       names the layer (or code) archive and the rule
├── SandboxError         the machine cannot give what an environment needs
└── ApiError             an HTTP API call refused, with Lambda's status and errorType
    └── Throttled        the Invoke API's 429, with Lambda's Reason

Every ``errorType`` lambdabox writes is a member of :class:`ErrorType` (a ``str``): the invoke outcomes Lambda
reports, the in-environment APIs' refusals, and the Invoke API's service errors. Bodies are rendered by
:func:`error_body` alone, as ``{"errorMessage", "errorType"}``.
"""

from __future__ import annotations

import enum
import json


class ErrorType(enum.StrEnum):
    """Lambda's error types, in its own spelling."""

    # An invoke's outcome, when Lambda (not the function) ended it (the invoke's error object).
    SANDBOX_TIMEDOUT = "Sandbox.Timedout"
    SANDBOX_SHUTDOWN = "Sandbox.Shutdown"  # the environment was shut down with the invoke waiting or under way
    RUNTIME_EXIT_ERROR = "Runtime.ExitError"
    RUNTIME_OUT_OF_MEMORY = "Runtime.OutOfMemory"
    RUNTIME_UNKNOWN = "Runtime.Unknown"  # an error the runtime posted without saying its type
    EXTENSION_CRASH = "Extension.Crash"
    RESPONSE_SIZE_TOO_LARGE = "Function.ResponseSizeTooLarge"
    # The Runtime and Extensions APIs' refusals.
    INVALID_STATE_TRANSITION = "InvalidStateTransition"
    INVALID_REQUEST_ID = "InvalidRequestID"
    INVALID_REQUEST_FORMAT = "InvalidRequestFormat"
    REQUEST_ENTITY_TOO_LARGE = "RequestEntityTooLarge"
    EXTENSION_ALREADY_REGISTERED = "Extension.AlreadyRegistered"
    EXTENSION_INVALID_EVENT_TYPE = "Extension.InvalidEventType"
    EXTENSION_INVALID_NAME = "Extension.InvalidExtensionName"
    EXTENSION_TOO_MANY = "Extension.TooManyExtensions"
    EXTENSION_UNKNOWN = "Extension.UnknownExtension"
    EXTENSION_UNKNOWN_IDENTIFIER = "Extension.UnknownExtensionIdentifier"
    # The Logs and Telemetry APIs' refusals.
    LOGS_VALIDATION = "Logs.ValidationError"
    LOGS_SUBSCRIPTION_CLOSED = "Logs.SubscriptionClosed"
    TELEMETRY_VALIDATION = "ValidationError"
    TELEMETRY_SUBSCRIPTION_CLOSED = "Telemetry.SubscriptionClosed"
    # The Invoke API's service errors (x-amzn-ErrorType).
    INVALID_PARAMETER_VALUE = "InvalidParameterValueException"
    INVALID_REQUEST_CONTENT = "InvalidRequestContentException"
    REQUEST_TOO_LARGE = "RequestTooLargeException"
    REQUEST_TIMEOUT = "RequestTimeout"  # AWS's word (S3's) for a request not sent whole in time; status 408 here
    RESOURCE_NOT_FOUND = "ResourceNotFoundException"
    SERVICE = "ServiceException"
    TOO_MANY_REQUESTS = "TooManyRequestsException"
    VALIDATION = "ValidationException"


class ThrottleReason(enum.StrEnum):
    """The ``Reason`` of a 429 from the Invoke API."""

    ACCOUNT = "ConcurrentInvocationLimitExceeded"
    RESERVED = "ReservedFunctionConcurrentInvocationLimitExceeded"


def error_body(error_type: str, message: str) -> bytes:
    """``{"errorMessage", "errorType"}`` as JSON: the shape of every error Lambda writes (API refusals and invoke
    errors alike)."""
    return json.dumps({"errorMessage": message, "errorType": str(error_type)}).encode()


class LambdaboxError(Exception):
    """Base of every error lambdabox raises on purpose."""


class ConfigError(LambdaboxError):
    """A template, layer or setting that lambdabox refuses before anything starts."""


class TemplateError(ConfigError):
    """A SAM/CloudFormation template that breaks a rule."""

    def __init__(self, source: str, resource: str | None, rule: str) -> None:
        where = f"{source}: {resource}" if resource else source
        super().__init__(f"{where}: {rule}")
        self.source = source
        self.resource = resource
        self.rule = rule


class LayerError(ConfigError):
    """A layer or code archive that breaks a rule (path traversal, size, count)."""

    def __init__(self, source: str, rule: str) -> None:
        super().__init__(f"{source}: {rule}")
        self.source = source
        self.rule = rule


class SandboxError(LambdaboxError):
    """The machine cannot provide an isolation or accounting feature an environment needs."""


class ApiError(LambdaboxError):
    """A refused API call: rendered as :func:`error_body` with ``status``."""

    def __init__(self, status: int, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> bytes:
        return error_body(self.error_type, self.message)


class Throttled(ApiError):
    """No execution environment may be started for this invoke: Lambda's 429 with its ``Reason``."""

    def __init__(self, reason: ThrottleReason) -> None:
        super().__init__(429, ErrorType.TOO_MANY_REQUESTS, "Rate Exceeded.")
        self.reason = reason
