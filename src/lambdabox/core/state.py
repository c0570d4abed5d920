"""The lifecycle's data: the function settings it runs with, the phase it is in, the invoke in flight (what it has
measured so far), and Init's time limit."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lambdabox.core.facts import Invoke

INIT_TIMEOUT_S = 10.0


class Phase(enum.Enum):
    UNINITIALIZED = "uninitialized"
    INIT = "init"
    READY = "ready"
    INVOKE = "invoke"
    SHUTDOWN = "shutdown"
    GONE = "gone"


@dataclass(frozen=True)
class Settings:
    """What the lifecycle needs to know of the function."""

    function_name: str
    version: str
    timeout_s: float
    extensions: tuple[str, ...]  # executables found in /opt/extensions, in start order
    freeze: bool = True
    marks: bool = False  # emit the lambdabox.* events a timeline is drawn from


@dataclass
class Invocation:
    invoke: Invoke
    started_at: float
    init_duration_ms: float | None
    responded: bool = False
    response_at: float | None = None
    first_byte_at: float | None = None
    produced_bytes: int = 0
    status: str = "success"
    error_type: str | None = None
    runtime_done_at: float | None = None
