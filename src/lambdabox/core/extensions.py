"""The Extensions API's bookkeeping: who registered, for which events, what each one is doing now, and the events
handed to each (at once when it waits in /event/next, else at its next call).

Pure data and rules (no I/O): registration validation, the 10-extension limit, identifier lookup, the shutdown budget.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lambdabox.core import facts as f
from lambdabox.core.errors import ApiError, ErrorType
from lambdabox.core.output import Output

MAX_EXTENSIONS = 10
EVENT_TYPES = frozenset({"INVOKE", "SHUTDOWN"})


class ExtensionState(enum.Enum):
    """Where an extension stands in the current phase."""

    REGISTERED = "registered"  # registered, has not asked for an event yet in this phase
    WAITING = "waiting"  # blocked in /event/next
    BUSY = "busy"  # holds an event it was given
    EXITED = "exited"  # reported an error or its process ended


@dataclass
class Extension:
    """One registered extension (external: started from /opt/extensions; internal: registered by the runtime)."""

    name: str
    identifier: str
    events: frozenset[str]
    external: bool
    state: ExtensionState = ExtensionState.REGISTERED
    pending: list[dict[str, Any]] = field(default_factory=list)  # events to hand over at the next /next


class ExtensionRegistry:
    """The extensions of one environment for one init: external names expected, registrations received."""

    def __init__(self, external_names: Iterable[str]) -> None:
        self.external_names = tuple(external_names)
        self._by_id: dict[str, Extension] = {}

    def __iter__(self) -> Iterator[Extension]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def register(self, name: str, events: Iterable[str], identifier: str, *, runtime_started: bool) -> Extension:
        if not name:
            raise ApiError(400, ErrorType.EXTENSION_INVALID_NAME, "Lambda-Extension-Name header is required")
        events = frozenset(events)
        unknown = events - EVENT_TYPES
        if unknown:
            raise ApiError(
                400,
                ErrorType.EXTENSION_INVALID_EVENT_TYPE,
                f"unknown event types {sorted(unknown)}; allowed: INVOKE, SHUTDOWN",
            )
        if any(ext.name == name for ext in self._by_id.values()):
            raise ApiError(403, ErrorType.EXTENSION_ALREADY_REGISTERED, f"extension {name!r} is already registered")
        external = name in self.external_names
        if not external and not runtime_started:
            raise ApiError(
                403,
                ErrorType.EXTENSION_UNKNOWN,
                f"{name!r} is not an executable in /opt/extensions; Lambda-Extension-Name must be its file name",
            )
        if not external and "SHUTDOWN" in events:
            raise ApiError(
                400, ErrorType.EXTENSION_INVALID_EVENT_TYPE, "internal extensions cannot register for SHUTDOWN"
            )
        if len(self._by_id) >= MAX_EXTENSIONS:
            raise ApiError(
                400, ErrorType.EXTENSION_TOO_MANY, f"a function may have at most {MAX_EXTENSIONS} extensions"
            )
        extension = Extension(name, identifier, events, external)
        self._by_id[identifier] = extension
        return extension

    def get(self, identifier: str | None) -> Extension:
        extension = self._by_id.get(identifier or "")
        if extension is None:
            raise ApiError(
                403, ErrorType.EXTENSION_UNKNOWN_IDENTIFIER, "missing or unknown Lambda-Extension-Identifier"
            )
        return extension

    def exited(self, identifier: str | None) -> Extension:
        """The extension reported an error: it takes no further part."""
        extension = self.get(identifier)
        extension.state = ExtensionState.EXITED
        return extension

    def by_name(self, name: str) -> Extension | None:
        return next((ext for ext in self._by_id.values() if ext.name == name), None)

    def all_external_registered(self) -> bool:
        registered = {ext.name for ext in self._by_id.values() if ext.external}
        return registered >= set(self.external_names)

    def live(self) -> list[Extension]:
        return [ext for ext in self._by_id.values() if ext.state is not ExtensionState.EXITED]

    def subscribed(self, event_type: str) -> list[Extension]:
        return [ext for ext in self.live() if event_type in ext.events]

    def all_waiting(self, event_type: str | None = None) -> bool:
        """Whether every live extension (registered for ``event_type``, if given) waits in /event/next."""
        found = self.live() if event_type is None else self.subscribed(event_type)
        return all(ext.state is ExtensionState.WAITING for ext in found)

    def shutdown_budget(self) -> tuple[float, float]:
        """Lambda's shutdown budget and the runtime's share of it, in seconds: 2000 / 300 ms with external extensions
        (500 ms for the runtime with an internal one too), 500 / 500 with internal ones only, else 0."""
        internal = any(not ext.external for ext in self._by_id.values())
        if self.external_names:
            return 2.0, 0.5 if internal else 0.3
        return (0.5, 0.5) if internal else (0.0, 0.0)

    def waiting(
        self, identifier: str | None, out: Output, *, flush_until: float | None = None, **mark: Any
    ) -> Extension:
        """The extension called /event/next (``mark``: the phase, the request): it waits, or is handed the event
        kept for it."""
        extension = self.get(identifier)
        extension.state = ExtensionState.WAITING
        out.mark(f.NEXT, extension.name, **mark)
        if extension.pending:
            self._deliver(extension, extension.pending.pop(0), out, flush_until)
        return extension

    def send(self, identifier: str, event: dict[str, Any], out: Output, *, flush_until: float | None = None) -> None:
        """Hand ``event`` to the extension now if it waits in /event/next, else at its next call. ``flush_until``:
        before a SHUTDOWN, the records produced so far are delivered to the subscribers (until then at most)."""
        extension = self.get(identifier)
        if extension.state is ExtensionState.WAITING:
            self._deliver(extension, event, out, flush_until)
        else:
            extension.pending.append(event)

    def _deliver(self, extension: Extension, event: dict[str, Any], out: Output, flush_until: float | None) -> None:
        extension.state = ExtensionState.BUSY
        if event["eventType"] == "SHUTDOWN" and flush_until is not None:
            out.add(f.FlushTelemetry(flush_until))
        out.add(f.DeliverExtensionEvent(extension.identifier, event))
        extra = {"requestId": event["requestId"]} if "requestId" in event else {}
        out.mark(f.EVENT_DELIVERED, extension.name, eventType=event["eventType"], **extra)
