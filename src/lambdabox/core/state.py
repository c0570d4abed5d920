"""The lifecycle's data: the function settings it runs with, the state it is in (Lambda's phase and its sub-phase),
the Init and shutdown in progress, and Lambda's time limits."""

from __future__ import annotations

import enum
from dataclasses import dataclass

INIT_TIMEOUT_S = 10.0
SLACK_S = 5.0
"""Beyond Lambda's own deadlines, for the machine to reap what was killed: no wait in lambdabox is unbounded."""
FLUSH_BEFORE_SHUTDOWN_S = 0.5
"""Of the extensions' shutdown budget, spent delivering the records produced so far before SHUTDOWN is handed out."""
PAUSE_BEFORE_FREEZE_S = 6.0
"""A telemetry delivery under way is let finish (each is bounded by its request timeout) before its listener freezes."""


INIT_BUDGET_S = INIT_TIMEOUT_S + SLACK_S
"""The longest an Init run ahead of any invoke may take to end, reaped."""


def invoke_budget_s(timeout_s: float) -> float:
    """The longest one invoke may take by Lambda's rules: an Init it waits for, the function timeout, and the slack."""
    return INIT_TIMEOUT_S + timeout_s + SLACK_S


class Phase(enum.Enum):
    """Lambda's phases of an execution environment."""

    UNINITIALIZED = "uninitialized"
    INIT = "init"
    READY = "ready"
    INVOKE = "invoke"
    SHUTDOWN = "shutdown"
    GONE = "gone"


class State(enum.Enum):
    """A phase and its sub-phase: what the transition table is keyed on."""

    UNINITIALIZED = "uninitialized"
    EXTENSION_INIT = "extension init"  # external extensions start and register; the runtime has not started
    RUNTIME_INIT = "runtime init"  # the runtime started (runtime and function init); waiting for every /next
    READY = "ready"
    FROZEN = "frozen"  # ready, with every process frozen
    INVOKE = "invoke"
    RESET_RUNTIME = "reset: runtime"  # a reset's shutdown: SIGTERM sent, waiting for the runtime to exit
    RESET_EXTENSIONS = "reset: extensions"  # a reset's shutdown: SHUTDOWN sent, waiting for the extensions
    SHUTDOWN_RUNTIME = "shutdown: runtime"
    SHUTDOWN_EXTENSIONS = "shutdown: extensions"
    GONE = "gone"

    @property
    def phase(self) -> Phase:
        return _PHASES[self]


_PHASES = {
    State.UNINITIALIZED: Phase.UNINITIALIZED,
    State.EXTENSION_INIT: Phase.INIT,
    State.RUNTIME_INIT: Phase.INIT,
    State.READY: Phase.READY,
    State.FROZEN: Phase.READY,
    State.INVOKE: Phase.INVOKE,
    State.RESET_RUNTIME: Phase.SHUTDOWN,
    State.RESET_EXTENSIONS: Phase.SHUTDOWN,
    State.SHUTDOWN_RUNTIME: Phase.SHUTDOWN,
    State.SHUTDOWN_EXTENSIONS: Phase.SHUTDOWN,
    State.GONE: Phase.GONE,
}
INIT_STATES = frozenset({State.EXTENSION_INIT, State.RUNTIME_INIT})
IDLE_STATES = frozenset({State.READY, State.FROZEN})
RESET_STATES = frozenset({State.RESET_RUNTIME, State.RESET_EXTENSIONS})
SHUTDOWN_STATES = frozenset({State.SHUTDOWN_RUNTIME, State.SHUTDOWN_EXTENSIONS})
RUNTIME_STAGES = frozenset({State.RESET_RUNTIME, State.SHUTDOWN_RUNTIME})


@dataclass(frozen=True)
class Settings:
    """What the lifecycle needs to know of the function."""

    function_name: str
    version: str
    timeout_s: float
    extensions: tuple[str, ...]  # executables found in /opt/extensions, in start order
    freeze: bool = True
    marks: bool = False  # emit the lambdabox.* events a timeline is drawn from
