"""What a process's exit means to the lifecycle: one of an Init given up on is ignored, one killed on purpose is not a
crash, and the memory limit is blamed only when the memory cgroup's OOM kill count rose since the exit before."""

from __future__ import annotations

from core_support import T0, TRACE, one
from lambdabox.core.facts import (
    FinishInvoke,
    FinishShutdown,
    Invoke,
    InvokeRequested,
    ProcessExited,
    Respond,
    RuntimeRequestedNext,
    StartRuntime,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import LambdaFailure
from lambdabox.core.processes import Processes
from lambdabox.core.state import Phase, Settings


def cold(lc: Lifecycle, request_id: str, at: float) -> int:
    """An invoke that starts an Init and reaches the runtime; the Init's generation."""
    commands = lc.handle(InvokeRequested(Invoke(request_id, b"{}", "arn", TRACE)), T0 + at)
    generation = one(commands, StartRuntime).generation
    lc.handle(RuntimeRequestedNext(), T0 + at + 0.1)
    return generation


def crash(lc: Lifecycle, at: float, generation: int, oom_kills: int) -> str:
    commands = lc.handle(ProcessExited(None, -9, oom_kills, generation), T0 + at)
    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert one(commands, FinishShutdown).reset
    return outcome.error_type


def test_only_a_rise_in_the_oom_count_is_out_of_memory() -> None:
    lc = Lifecycle(Settings("fn", "$LATEST", 3.0, ()))
    first = cold(lc, "r1", 0.0)
    assert crash(lc, 0.5, first, oom_kills=1) == "Runtime.OutOfMemory"
    second = cold(lc, "r2", 1.0)
    assert second == first + 1
    assert crash(lc, 1.5, second, oom_kills=1) == "Runtime.ExitError"  # the same count: not the memory limit
    third = cold(lc, "r3", 2.0)
    assert crash(lc, 2.5, third, oom_kills=2) == "Runtime.OutOfMemory"
    assert lc.failure == "Runtime.OutOfMemory"  # why the invoke failed, as the pool reports it


def test_an_exit_from_an_earlier_init_is_ignored() -> None:
    lc = Lifecycle(Settings("fn", "$LATEST", 3.0, ()))
    first = cold(lc, "r1", 0.0)
    crash(lc, 0.5, first, oom_kills=0)
    second = cold(lc, "r2", 1.0)
    assert lc.handle(ProcessExited(None, -9, 0, first), T0 + 1.2) == []  # the old runtime, reaped late
    assert lc.phase is Phase.INVOKE
    assert lc.current_request_id == "r2"
    assert lc.handle(ProcessExited(None, 1, 0, second), T0 + 1.3)  # the live one is a crash
    assert lc.phase is Phase.UNINITIALIZED


def test_a_failed_invoke_is_finished_once() -> None:
    lc = Lifecycle(Settings("fn", "$LATEST", 3.0, ()))
    generation = cold(lc, "r1", 0.0)
    commands = lc.handle(ProcessExited(None, 1, None, generation), T0 + 0.5)
    assert one(commands, FinishInvoke).error_type == "Runtime.ExitError"


def test_the_bookkeeping_on_its_own() -> None:
    processes = Processes()
    processes.alive.update({None, "ext"})
    ended = processes.exited(ProcessExited("ext", 0, 3, 1), generation=1)
    assert ended is not None and ended.unexpected and ended.out_of_memory and ended.description == "exit status 0"
    again = processes.exited(ProcessExited("ext", 0, 3, 1), generation=1)
    assert again is not None and not again.unexpected and not again.out_of_memory
    assert processes.exited(ProcessExited(None, 0, 3, 0), generation=1) is None
    assert None in processes
