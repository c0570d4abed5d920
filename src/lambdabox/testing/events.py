"""What a test reads of a function's events: an invoke's outcome, REPORT and events (:class:`Invocation`), the steps
each extension went through (:class:`ExtensionEvent`), and the log lines failure messages show."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lambdabox.core import facts as f
from lambdabox.core.errors import error_body
from lambdabox.core.model import LambdaFailure, Outcome, Response
from lambdabox.environment.report import Report, TelemetryEvent

LAST_LINES = 15  # log lines shown in failure messages
LOG_TYPES = ("function", "extension")
EXTENSION_STATES = ("Started", "Ready", "Waiting", "INVOKE", "SHUTDOWN", "Exited", "Killed")
"""Started: its process was launched. Ready: it registered (``detail``: its events). Waiting: it called /event/next,
done with the event before (``detail``: the phase). INVOKE, SHUTDOWN: it was handed that event. Exited: its process
ended by itself (``detail``: how). Killed: it was still running when the environment was shut down or reset."""


@dataclass(frozen=True)
class ExtensionEvent:
    """A step of an extension's lifecycle (see EXTENSION_STATES), from the event that tells of it."""

    time: float
    name: str
    state: str
    record: Mapping[str, Any]  # the platform.extension or lambdabox.* record
    detail: str = ""

    @property
    def request_id(self) -> str | None:
        return self.record.get("requestId")


def extension_step(event: TelemetryEvent) -> ExtensionEvent | None:
    """The extension step an event tells of: platform.extension (Ready), and the lifecycle's lambdabox.* marks."""
    record = event.record
    if not isinstance(record, Mapping):
        return None
    if event.type == "platform.extension":
        events = ", ".join(record.get("events", ()))
        return ExtensionEvent(event.time, str(record.get("name")), "Ready", record, events)
    if record.get("process") != "extension":
        return None
    match event.type:
        case f.PROCESS_START:
            state, detail = "Started", ""
        case f.NEXT:
            state, detail = "Waiting", str(record.get("phase", ""))
        case f.EVENT_DELIVERED:
            state, detail = str(record.get("eventType")), str(record.get("requestId", ""))
        case f.PROCESS_EXIT:
            state, detail = "Exited", str(record.get("description", ""))
        case f.SIGNAL if record.get("signal") == "SIGKILL":
            state, detail = "Killed", ""
        case _:
            return None
    return ExtensionEvent(event.time, str(record.get("name")), state, record, detail)


@dataclass(frozen=True)
class Invocation:
    """One invoke's outcome and REPORT, and the events produced while it ran (Init's too, for a cold start)."""

    request_id: str
    outcome: Outcome
    report: Report
    events: tuple[TelemetryEvent, ...]

    @property
    def ok(self) -> bool:
        return isinstance(self.outcome, Response)

    @property
    def payload(self) -> bytes:
        """What the caller receives: the response, or the error object."""
        if isinstance(self.outcome, LambdaFailure):
            return error_body(self.outcome.error_type, self.outcome.message)
        return self.outcome.body

    @property
    def response(self) -> Any:
        """The payload decoded: JSON when it is JSON, else text, else bytes."""
        try:
            return json.loads(self.payload)
        except ValueError:
            pass
        try:
            return self.payload.decode()
        except UnicodeDecodeError:
            return self.payload

    @property
    def error_type(self) -> str | None:
        return None if isinstance(self.outcome, Response) else self.outcome.error_type

    @property
    def error_message(self) -> str | None:
        error = None if self.ok else self.response
        return str(error.get("errorMessage", "")) if isinstance(error, dict) else None

    @property
    def logs(self) -> list[str]:
        return log_lines(self.events)


def log_lines(events: Iterable[TelemetryEvent], source: str | None = None) -> list[str]:
    return [str(e.record) for e in events if e.type in LOG_TYPES and source in (None, e.source)]


def last_lines(events: Iterable[TelemetryEvent]) -> str:
    lines = [f"  [{e.source}] " + str(e.record).replace("\n", "\n    ") for e in events if e.type in LOG_TYPES]
    return "\n".join([f"last log lines ({min(LAST_LINES, len(lines))} of {len(lines)}):", *lines[-LAST_LINES:]])
