"""The Extensions API's bookkeeping: who registered, for which events, and what each one is doing now.

Pure data and rules (no I/O): registration validation, the 10-extension limit, identifier lookup.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lambdabox.core.errors import ApiError

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
            raise ApiError(400, "Extension.InvalidExtensionName", "Lambda-Extension-Name header is required")
        events = frozenset(events)
        unknown = events - EVENT_TYPES
        if unknown:
            raise ApiError(
                400, "Extension.InvalidEventType", f"unknown event types {sorted(unknown)}; allowed: INVOKE, SHUTDOWN"
            )
        if any(ext.name == name for ext in self._by_id.values()):
            raise ApiError(403, "Extension.AlreadyRegistered", f"extension {name!r} is already registered")
        external = name in self.external_names
        if not external and not runtime_started:
            raise ApiError(
                403,
                "Extension.UnknownExtension",
                f"{name!r} is not an executable in /opt/extensions; Lambda-Extension-Name must be its file name",
            )
        if not external and "SHUTDOWN" in events:
            raise ApiError(400, "Extension.InvalidEventType", "internal extensions cannot register for SHUTDOWN")
        if len(self._by_id) >= MAX_EXTENSIONS:
            raise ApiError(
                400, "Extension.TooManyExtensions", f"a function may have at most {MAX_EXTENSIONS} extensions"
            )
        extension = Extension(name, identifier, events, external)
        self._by_id[identifier] = extension
        return extension

    def get(self, identifier: str | None) -> Extension:
        extension = self._by_id.get(identifier or "")
        if extension is None:
            raise ApiError(
                403, "Extension.UnknownExtensionIdentifier", "missing or unknown Lambda-Extension-Identifier"
            )
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
