"""What the HTTP adapters need from what serves them: the in-environment APIs (Runtime, Extensions, Logs, Telemetry)
from the environment (:class:`EnvironmentPort`): submit a fact, await an event; the Invoke API from the server
(:class:`lambdabox.api.invoke.Invoker`)."""

from __future__ import annotations

from typing import Any, Protocol

from lambdabox.core.facts import ExtensionRequestedNext, Fact, Invoke, RuntimeRequestedNext
from lambdabox.core.model import FunctionConfig


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
