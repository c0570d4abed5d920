"""Plain data shared by every layer: a function's configuration and an invoke's outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT_ID = "123456789012"
LATEST = "$LATEST"
DEFAULT_MAXIMUM_RETRY_ATTEMPTS = 2
DEFAULT_MAXIMUM_EVENT_AGE_S = 6 * 60 * 60


@dataclass(frozen=True)
class LayerConfig:
    """One layer: a directory or a .zip on disk, extracted into /opt in template order."""

    name: str  # logical id (or file name when given inline)
    content: Path  # absolute path to a directory or a .zip


@dataclass(frozen=True)
class EventInvokeConfig:
    """How Lambda handles the function's asynchronous invokes: retries, event age, and where records go."""

    maximum_retry_attempts: int = DEFAULT_MAXIMUM_RETRY_ATTEMPTS
    maximum_event_age_s: int = DEFAULT_MAXIMUM_EVENT_AGE_S
    on_success: str | None = None  # a destination ARN (or a function name)
    on_failure: str | None = None


@dataclass(frozen=True)
class FunctionConfig:
    """What Lambda knows of a function: code, runtime, layers, environment and limits."""

    logical_id: str
    function_name: str
    runtime: str  # e.g. "python3.12", "nodejs20.x", "provided.al2023"
    handler: str  # "" is allowed for provided.* runtimes
    code: Path  # absolute path to a directory or a .zip
    layers: tuple[LayerConfig, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 3.0
    memory_mb: int = 128
    ephemeral_storage_mb: int = 512  # the size of /tmp (EphemeralStorage.Size)
    template: Path | None = None
    reserved_concurrency: int | None = None
    provisioned_concurrency: int | None = None
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT_ID
    version: str = LATEST
    event_invoke: EventInvokeConfig = EventInvokeConfig()

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{self.function_name}"


@dataclass(frozen=True)
class Response:
    """The runtime posted a response; ``body`` is passed through untouched."""

    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class FunctionFailure:
    """The runtime posted an error for the invoke (a handled or unhandled function error)."""

    body: bytes  # the ErrorRequest JSON as the runtime sent it (normalised to errorType/errorMessage)
    error_type: str


@dataclass(frozen=True)
class LambdaFailure:
    """Lambda itself ended the invoke: Sandbox.Timedout, Runtime.ExitError, Extension.Crash, ..."""

    error_type: str
    message: str


Outcome = Response | FunctionFailure | LambdaFailure
