"""The pure pieces of the lifecycle's records: the platform records and Extensions API events it emits, durations in
milliseconds, response spans with ISO times, the billed duration, Lambda's wording and error for how a process ended,
and how a mark names a process."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from lambdabox.core.errors import ErrorType
from lambdabox.core.facts import Invoke
from lambdabox.core.model import LambdaFailure
from lambdabox.core.state import Settings


def exit_description(returncode: int) -> str:
    """Lambda's wording for how a process ended ("exit status 1", "signal: killed")."""
    if returncode >= 0:
        return f"exit status {returncode}"
    names = {9: "killed", 15: "terminated", 11: "segmentation fault", 6: "aborted"}
    return f"signal: {names.get(-returncode, str(-returncode))}"


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def who(name: str | None) -> dict[str, str]:
    """How a mark names a process: ``name`` is an extension's, None the runtime."""
    return {"process": "runtime"} if name is None else {"process": "extension", "name": name}


def span(name: str, start: float, end: float) -> dict[str, Any]:
    return {"name": name, "start": _iso(start), "durationMs": ms(end - start)}


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def billed_ms(duration_ms: float) -> int:
    """Lambda bills in 1 ms steps, rounding up."""
    return max(1, math.ceil(duration_ms))


def tracing(trace_id: str) -> dict[str, str]:
    return {"type": "X-Amzn-Trace-Id", "value": trace_id}


def init_start(initialization_type: str, settings: Settings) -> dict[str, Any]:
    """The ``platform.initStart`` record."""
    return {
        "initializationType": initialization_type,
        "phase": "init",
        "functionName": settings.function_name,
        "functionVersion": settings.version,
    }


def init_end(
    initialization_type: str, status: str, error_type: str | None, duration_ms: float
) -> list[tuple[str, dict[str, Any]]]:
    """The ``platform.initRuntimeDone`` and ``platform.initReport`` records of an Init that ended."""
    common: dict[str, Any] = {"initializationType": initialization_type, "phase": "init", "status": status}
    if error_type is not None:
        common["errorType"] = error_type
    return [
        ("platform.initRuntimeDone", common),
        ("platform.initReport", {**common, "metrics": {"durationMs": duration_ms}}),
    ]


def invoke_event(invoke: Invoke, deadline: float) -> dict[str, Any]:
    """The Extensions API's INVOKE event (no payload: extensions never see it)."""
    return {
        "eventType": "INVOKE",
        "deadlineMs": int(deadline * 1000),
        "requestId": invoke.request_id,
        "invokedFunctionArn": invoke.invoked_function_arn,
        "tracing": tracing(invoke.trace_id),
    }


def shutdown_event(reason: str, deadline: float) -> dict[str, Any]:
    return {"eventType": "SHUTDOWN", "shutdownReason": reason, "deadlineMs": int(deadline * 1000)}


def crash_failure(extension: str | None, how: str, *, out_of_memory: bool) -> LambdaFailure:
    """Lambda's error for a process that ended by itself (``extension`` None: the runtime)."""
    if out_of_memory:
        return LambdaFailure(ErrorType.RUNTIME_OUT_OF_MEMORY, f"Runtime exited with error: {how}")
    if extension is None:
        return LambdaFailure(ErrorType.RUNTIME_EXIT_ERROR, f"Runtime exited with error: {how}")
    return LambdaFailure(ErrorType.EXTENSION_CRASH, f"Extension {extension} exited with error: {how}")
