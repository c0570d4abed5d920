"""Lambda's own log lines on the console: START, END, REPORT, INIT_START, EXTENSION, and the processes' output."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from lambdabox.environment.report import TelemetryEvent


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def format_event(event: TelemetryEvent) -> str | None:
    """The CloudWatch line Lambda writes for this event, or None for events that have no line."""
    record: Any = event.record
    match event.type:
        case "function":
            return str(record)
        case "extension":
            return f"[{event.source}] {record}" if event.source else str(record)
        case "platform.initStart":
            return f"INIT_START Function: {record.get('functionName')} Type: {record.get('initializationType')}"
        case "platform.extension":
            return (
                f"EXTENSION\tName: {record['name']}\tState: {record['state']}\tEvents: [{', '.join(record['events'])}]"
            )
        case "platform.initReport" if record.get("status") != "success":
            duration = _ms(record["metrics"]["durationMs"])
            return (
                f"INIT_REPORT Init Duration: {duration}\tPhase: init\tStatus: error\tError Type: {record['errorType']}"
            )
        case "platform.start":
            return f"START RequestId: {record['requestId']} Version: {record.get('version', '$LATEST')}"
        case "platform.report":
            return f"END RequestId: {record['requestId']}\n{format_report(record)}"
    return None


def format_report(record: dict[str, Any]) -> str:
    metrics = record["metrics"]
    parts = [
        f"REPORT RequestId: {record['requestId']}",
        f"Duration: {_ms(metrics['durationMs'])}",
        f"Billed Duration: {metrics['billedDurationMs']} ms",
        f"Memory Size: {metrics['memorySizeMB']} MB",
        f"Max Memory Used: {metrics['maxMemoryUsedMB']} MB",
    ]
    if "initDurationMs" in metrics:
        parts.append(f"Init Duration: {_ms(metrics['initDurationMs'])}")
    if record.get("status", "success") != "success":
        parts.append(f"Status: {record['status']}")
        if record.get("errorType"):
            parts.append(f"Error Type: {record['errorType']}")
    return "\t".join(parts)


class Console:
    """An observer that writes every event's log line to a stream (stderr by default), in order.

    ``after_report``, given an invoke's request id, returns lines to write right after its REPORT line (or None),
    such as :meth:`lambdabox.observe.timeline.Timeline.compact`; they are the console's own, not the function's log.
    """

    def __init__(self, stream: TextIO | None = None, after_report: Callable[[str], str | None] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.after_report = after_report

    def __call__(self, event: TelemetryEvent) -> None:
        line = format_event(event)
        if line is None:
            return
        if event.type == "platform.report" and self.after_report is not None:
            extra = self.after_report(str(event.record["requestId"]))
            line = line if extra is None else f"{line}\n{extra}"
        self.stream.write(line + "\n")
        self.stream.flush()
