"""What an environment reports: each record its observers see (``TelemetryEvent``, as the Telemetry API shapes
it), and each invoke's result with Lambda's REPORT figures (``InvokeResult``, ``Report``, and the
``platform.report`` record rendered from them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lambdabox.core.model import Outcome


@dataclass(frozen=True)
class TelemetryEvent:
    """A record as the Telemetry API shapes it: ``platform.*`` events, and ``function``/``extension`` lines."""

    time: float
    type: str
    record: Any
    source: str = ""  # for function/extension lines: the process that wrote it


Observer = Callable[[TelemetryEvent], None]


@dataclass(frozen=True)
class Report:
    request_id: str
    status: str
    error_type: str | None
    duration_ms: float
    billed_duration_ms: int
    memory_size_mb: int
    max_memory_used_mb: int
    init_duration_ms: float | None
    post_runtime_extensions_ms: float | None


@dataclass(frozen=True)
class InvokeResult:
    request_id: str
    outcome: Outcome
    report: Report


def report_record(report: Report) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "durationMs": report.duration_ms,
        "billedDurationMs": report.billed_duration_ms,
        "memorySizeMB": report.memory_size_mb,
        "maxMemoryUsedMB": report.max_memory_used_mb,
    }
    if report.init_duration_ms is not None:
        metrics["initDurationMs"] = report.init_duration_ms
    record: dict[str, Any] = {"requestId": report.request_id, "status": report.status, "metrics": metrics}
    if report.error_type:
        record["errorType"] = report.error_type
    return record
