"""What the HTTP adapters need from what serves them: the in-environment APIs (Runtime, Extensions, Logs, Telemetry)
from the environment (:class:`EnvironmentPort`): submit a fact, await an event; the Invoke API from the server
(:class:`Invoker`): find a function, invoke it or queue the invoke."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from lambdabox.core.facts import ExtensionRequestedNext, Fact, Invoke, RuntimeRequestedNext
from lambdabox.core.model import FunctionConfig, Outcome


class EnvironmentPort(Protocol):
    config: FunctionConfig

    def now(self) -> float:
        """Epoch seconds on a monotonic base."""

    def submit(self, fact: Fact) -> None:
        """Hand a fact to the lifecycle core; raises ApiError when the core refuses it."""

    async def runtime_next(self, fact: RuntimeRequestedNext) -> tuple[Invoke, float]:
        """Submit the runtime's /next and wait for its invoke and deadline (epoch seconds)."""

    async def extension_next(self, fact: ExtensionRequestedNext) -> dict[str, Any]:
        """Submit an extension's /event/next and wait for its event."""


@dataclass(frozen=True)
class Answer:
    """A synchronous invoke's outcome, and the base64 tail of its log when it was asked for."""

    request_id: str
    outcome: Outcome
    log_result: str | None = None


class Invoker(Protocol):
    """What the Invoke API needs from the server behind it."""

    def function(self, name: str) -> FunctionConfig | None:
        """The function with this logical id or FunctionName (``function`` for a single-function template)."""

    async def invoke(
        self, config: FunctionConfig, payload: bytes, *, client_context: str | None, invoked_arn: str, tail: bool
    ) -> Answer:
        """Invoke synchronously; returns as soon as the outcome is known (with ``tail``: once the invoke is over)."""

    def enqueue(self, config: FunctionConfig, payload: bytes) -> str:
        """Queue an asynchronous invoke; returns its request id."""

    def report(self, text: str) -> None:
        """Tell the operator about a problem that the caller only sees as a ServiceException."""
