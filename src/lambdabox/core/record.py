"""The small pure pieces of the lifecycle's records: durations in milliseconds, response spans with ISO times, the
billed duration, Lambda's wording for how a process ended, and how a mark names a process."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


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
