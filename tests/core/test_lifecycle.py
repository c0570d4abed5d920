"""The lifecycle state machine without extensions (or with as few as a scenario needs): init, invoke, timeouts,
crashes, resets, shutdown budgets, denied transitions and the freeze option. Time is passed in; nothing sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from core_support import T0, TRACE, of_type, one, platform
from lambdabox.core.errors import ApiError
from lambdabox.core.facts import (
    ArmTimer,
    CancelTimer,
    Command,
    DeadlinePassed,
    DeliverExtensionEvent,
    DeliverInvoke,
    EmitPlatformEvent,
    ErrorPosted,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    FinishInvoke,
    FinishShutdown,
    Freeze,
    InitErrorPosted,
    InitRequested,
    Invoke,
    InvokeRequested,
    Kill,
    KillAll,
    ProcessExited,
    Respond,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    StartExtension,
    StartRuntime,
    TerminateRuntime,
    Thaw,
    Timer,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.core.state import Phase, Settings, State

ARN = "arn:aws:lambda:us-east-1:123456789012:function:fn"


# ---- helpers -----------------------------------------------------------------------------------------------------


def invoke(request_id: str = "req-1") -> Invoke:
    return Invoke(request_id, b'{"hello": "world"}', ARN, TRACE)


def record(commands: list[Command], type_: str) -> dict[str, Any]:
    records = platform(commands, type_)
    assert len(records) == 1, f"expected one {type_}, got {records}"
    return records[0]


def budget(commands: list[Command], timer: Timer, now: float) -> float:
    """Seconds from ``now`` to the deadline this batch armed for ``timer``."""
    (armed,) = [c for c in of_type(commands, ArmTimer) if c.timer is timer]
    return armed.at - now


def label(command: Command) -> str:
    return command.type if isinstance(command, EmitPlatformEvent) else type(command).__name__


def labels(commands: list[Command]) -> list[str]:
    return [label(c) for c in commands]


def assert_order(commands: list[Command], *expected: str) -> None:
    """Each label in ``expected`` appears, and in this order (other commands may come between)."""
    seen = labels(commands)
    positions = [seen.index(name) for name in expected]
    assert positions == sorted(positions), f"expected {expected} in order, got {seen}"


class Env:
    """One execution environment driven fact by fact; ``now`` is kept here and advanced explicitly."""

    def __init__(self, *, timeout_s: float = 1.0, extensions: tuple[str, ...] = (), freeze: bool = True) -> None:
        self.lc = Lifecycle(Settings("fn", "$LATEST", timeout_s, extensions, freeze))
        self.now = T0
        self.history: list[Command] = []

    @property
    def phase(self) -> Phase:
        return self.lc.phase

    def at(self, seconds: float) -> Env:
        """Move the clock to T0 + seconds."""
        self.now = T0 + seconds
        return self

    def do(self, fact: Fact) -> list[Command]:
        commands = self.lc.handle(fact, self.now)
        self.history.extend(commands)
        return commands

    # scenario steps

    def cold_invoke(self, request_id: str = "req-1") -> list[Command]:
        """InvokeRequested from UNINITIALIZED, then the runtime's first /next (0.25 s later): the invoke is out."""
        self.do(InvokeRequested(invoke(request_id)))
        self.now += 0.25
        return self.do(RuntimeRequestedNext())

    def respond(self, request_id: str = "req-1", body: bytes = b'{"ok": true}') -> list[Command]:
        return self.do(ResponsePosted(request_id, body, "application/json", first_byte_at=self.now))

    def complete(self, request_id: str = "req-1") -> list[Command]:
        """The runtime posts its response, then asks for the next event 0.25 s later."""
        self.respond(request_id)
        self.now += 0.25
        return self.do(RuntimeRequestedNext())

    def register(self, name: str, events: tuple[str, ...] = ("INVOKE", "SHUTDOWN")) -> list[Command]:
        return self.do(ExtensionRegistered(name, events, f"id-{name}"))

    def ext_next(self, name: str) -> list[Command]:
        return self.do(ExtensionRequestedNext(f"id-{name}"))

    def warm(self) -> Env:
        """A finished cold invoke: the environment is READY (and frozen)."""
        self.cold_invoke("req-0")
        self.complete("req-0")
        assert self.phase is Phase.READY
        return self


def denied(env: Env, fact: Fact) -> ApiError:
    with pytest.raises(ApiError) as caught:
        env.do(fact)
    return caught.value


# ---- cold invoke, no extensions ------------------------------------------------------------------------------------


def test_invoke_from_uninitialized_starts_init_and_the_runtime() -> None:
    env = Env()
    commands = env.do(InvokeRequested(invoke()))

    assert env.phase is Phase.INIT
    assert ArmTimer(Timer.INIT, T0 + 10.0) in commands
    assert one(commands, StartRuntime) == StartRuntime("on-demand", generation=1)
    start = record(commands, "platform.initStart")
    assert start["initializationType"] == "on-demand"
    assert start["phase"] == "init"
    assert start["functionName"] == "fn"
    assert start["functionVersion"] == "$LATEST"
    assert not of_type(commands, StartExtension)
    assert not of_type(commands, DeliverInvoke)
    assert_order(commands, "platform.initStart", "StartRuntime")


def test_runtime_next_ends_init_and_delivers_the_pending_invoke() -> None:
    env = Env(timeout_s=1.0)
    env.do(InvokeRequested(invoke()))
    commands = env.at(0.25).do(RuntimeRequestedNext())

    assert env.phase is Phase.INVOKE
    assert CancelTimer(Timer.INIT) in commands
    done = record(commands, "platform.initRuntimeDone")
    assert done["status"] == "success"
    assert done["phase"] == "init"
    report = record(commands, "platform.initReport")
    assert report["metrics"] == {"durationMs": 250.0}
    assert report["status"] == "success"
    start = record(commands, "platform.start")
    assert start["requestId"] == "req-1"
    assert start["tracing"] == {"type": "X-Amzn-Trace-Id", "value": TRACE}
    deliver = one(commands, DeliverInvoke)
    assert deliver == DeliverInvoke(invoke(), T0 + 0.25 + 1.0)
    assert ArmTimer(Timer.INVOKE, T0 + 1.25) in commands
    assert not of_type(commands, Freeze)
    assert_order(commands, "platform.initRuntimeDone", "platform.initReport", "platform.start", "DeliverInvoke")


def test_response_is_handed_to_the_caller_at_once() -> None:
    env = Env()
    env.cold_invoke()
    commands = env.at(0.75).respond(body=b'{"answer": 42}')

    assert commands == [Respond("req-1", Response(b'{"answer": 42}', "application/json"))]
    assert env.phase is Phase.INVOKE


def test_runtime_next_after_the_response_ends_the_invoke() -> None:
    env = Env()
    env.cold_invoke()  # invoke starts at T0 + 0.25
    env.at(0.5).do(ResponsePosted("req-1", b"12345", "application/json", first_byte_at=T0 + 0.375))
    commands = env.at(1.0).do(RuntimeRequestedNext())

    done = record(commands, "platform.runtimeDone")
    assert done["requestId"] == "req-1"
    assert done["status"] == "success"
    assert done["metrics"] == {"durationMs": 750.0, "producedBytes": 5}
    assert done["spans"] == [
        {"name": "responseLatency", "start": "2023-11-14T22:13:20.250Z", "durationMs": 125.0},
        {"name": "responseDuration", "start": "2023-11-14T22:13:20.375Z", "durationMs": 125.0},
    ]
    finish = one(commands, FinishInvoke)
    assert finish == FinishInvoke("req-1", "success", None, 750.0, 250.0, 0.0)
    assert CancelTimer(Timer.INVOKE) in commands
    assert labels(commands)[-1] == "Freeze"
    assert_order(commands, "platform.runtimeDone", "FinishInvoke", "Freeze")
    assert env.phase is Phase.READY
    assert env.lc.current_request_id is None


def test_function_error_is_handed_to_the_caller_and_reported() -> None:
    env = Env()
    env.cold_invoke()
    body = b'{"errorType": "ValueError", "errorMessage": "bad"}'
    commands = env.at(0.5).do(ErrorPosted("req-1", "ValueError", body))
    assert commands == [Respond("req-1", FunctionFailure(body, "ValueError"))]

    commands = env.at(0.75).do(RuntimeRequestedNext())
    done = record(commands, "platform.runtimeDone")
    assert done["status"] == "error"
    assert done["errorType"] == "ValueError"
    finish = one(commands, FinishInvoke)
    assert (finish.status, finish.error_type) == ("error", "ValueError")
    assert env.phase is Phase.READY


def test_init_requested_inits_ahead_of_any_invoke_and_freezes() -> None:
    env = Env()
    commands = env.do(InitRequested("provisioned-concurrency"))
    assert one(commands, StartRuntime) == StartRuntime("provisioned-concurrency", generation=1)
    assert record(commands, "platform.initStart")["initializationType"] == "provisioned-concurrency"

    commands = env.at(0.5).do(RuntimeRequestedNext())
    assert record(commands, "platform.initReport")["metrics"] == {"durationMs": 500.0}
    assert not of_type(commands, DeliverInvoke)
    assert labels(commands)[-1] == "Freeze"
    assert env.phase is Phase.READY


def test_a_second_invoke_while_one_waits_for_init_is_throttled() -> None:
    env = Env()
    env.do(InvokeRequested(invoke("req-1")))
    error = denied(env, InvokeRequested(invoke("req-2")))
    assert error.status == 429
    assert error.error_type == "TooManyRequestsException"


# ---- warm invoke ---------------------------------------------------------------------------------------------------


def test_warm_invoke_thaws_then_delivers_without_init() -> None:
    env = Env(timeout_s=1.0).warm()
    commands = env.at(5.0).do(InvokeRequested(invoke("req-2")))

    assert labels(commands).index("Thaw") < labels(commands).index("DeliverInvoke")
    assert one(commands, DeliverInvoke) == DeliverInvoke(invoke("req-2"), T0 + 6.0)
    assert not platform(commands, "platform.initStart")
    assert not of_type(commands, StartRuntime)
    assert record(commands, "platform.start")["requestId"] == "req-2"


def test_init_duration_is_reported_on_the_first_invoke_only() -> None:
    env = Env()
    env.cold_invoke("req-1")
    first = one(env.complete("req-1"), FinishInvoke)
    env.at(5.0).do(InvokeRequested(invoke("req-2")))
    env.at(5.25).respond("req-2")
    second = one(env.at(5.5).do(RuntimeRequestedNext()), FinishInvoke)

    assert first.init_duration_ms == 250.0
    assert second.init_duration_ms is None
    assert second.duration_ms == 500.0
    assert second.status == "success"


# ---- timeout -------------------------------------------------------------------------------------------------------


def test_timeout_fails_the_invoke_and_resets_the_environment() -> None:
    env = Env(timeout_s=1.0)
    env.cold_invoke()
    commands = env.at(1.25).do(DeadlinePassed(Timer.INVOKE))

    respond = one(commands, Respond)
    assert respond.request_id == "req-1"
    assert isinstance(respond.outcome, LambdaFailure)
    assert respond.outcome.error_type == "Sandbox.Timedout"
    assert respond.outcome.message.endswith("Task timed out after 1.00 seconds")
    assert record(commands, "platform.runtimeDone")["status"] == "timeout"
    finish = one(commands, FinishInvoke)
    assert (finish.status, finish.error_type) == ("timeout", "Sandbox.Timedout")
    assert finish.duration_ms == 1000.0
    # no extensions: the shutdown budget is 0 ms
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("timeout", reset=True)
    assert_order(commands, "Respond", "platform.runtimeDone", "FinishInvoke", "KillAll", "FinishShutdown")
    assert env.phase is Phase.UNINITIALIZED


def test_timeout_with_an_extension_terminates_the_runtime_then_shuts_extensions_down() -> None:
    env = Env(timeout_s=1.0, extensions=("ext",))
    env.do(InvokeRequested(invoke()))
    env.do(ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"))
    env.at(0.25).do(RuntimeRequestedNext())
    env.do(ExtensionRequestedNext("id-ext"))  # init ends; the invoke goes out
    env.at(0.5).do(ExtensionRequestedNext("id-ext"))  # the extension is done with INVOKE

    commands = env.at(1.25).do(DeadlinePassed(Timer.INVOKE))
    assert one(commands, FinishInvoke).status == "timeout"
    assert ArmTimer(Timer.SHUTDOWN, T0 + 3.25) in commands
    assert budget(commands, Timer.RUNTIME_SHUTDOWN, env.now) == pytest.approx(0.3, abs=1e-6)
    assert of_type(commands, TerminateRuntime)
    assert not of_type(commands, DeliverExtensionEvent)  # the runtime goes first
    assert not of_type(commands, KillAll)
    assert_order(commands, "Respond", "FinishInvoke", "TerminateRuntime")
    assert env.phase is Phase.SHUTDOWN

    commands = env.at(1.5).do(ProcessExited(None, -15))
    assert one(commands, DeliverExtensionEvent) == DeliverExtensionEvent(
        "id-ext", {"eventType": "SHUTDOWN", "shutdownReason": "timeout", "deadlineMs": 1_700_000_003_250}
    )
    assert CancelTimer(Timer.RUNTIME_SHUTDOWN) in commands

    commands = env.at(1.75).do(ProcessExited("ext", 0))
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("timeout", reset=True)
    assert env.phase is Phase.UNINITIALIZED

    commands = env.at(5.0).do(InvokeRequested(invoke("req-2")))
    assert env.phase is Phase.INIT
    assert platform(commands, "platform.initStart")
    assert one(commands, StartExtension) == StartExtension("ext", generation=2)  # the Init after the reset
    assert not of_type(commands, StartRuntime)  # waits for the extension to register again


def test_after_a_timeout_reset_the_next_invoke_reports_a_new_init() -> None:
    env = Env(timeout_s=1.0)
    env.cold_invoke("req-1")
    env.at(1.25).do(DeadlinePassed(Timer.INVOKE))

    env.at(5.0).do(InvokeRequested(invoke("req-2")))
    commands = env.at(5.5).do(RuntimeRequestedNext())
    assert record(commands, "platform.initReport")["metrics"] == {"durationMs": 500.0}
    assert one(commands, DeliverInvoke).invoke.request_id == "req-2"
    env.at(6.0).respond("req-2")
    finish = one(env.at(6.25).do(RuntimeRequestedNext()), FinishInvoke)
    assert finish.init_duration_ms == 500.0
    assert finish.status == "success"


# ---- crashes -------------------------------------------------------------------------------------------------------


def test_runtime_crash_during_invoke_is_a_runtime_exit_error() -> None:
    env = Env()
    env.cold_invoke()
    commands = env.at(0.5).do(ProcessExited(None, 1))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Runtime.ExitError"
    assert outcome.message.endswith("Runtime exited with error: exit status 1")
    assert "req-1" in outcome.message
    done = record(commands, "platform.runtimeDone")
    assert (done["status"], done["errorType"]) == ("failure", "Runtime.ExitError")
    finish = one(commands, FinishInvoke)
    assert (finish.status, finish.error_type) == ("failure", "Runtime.ExitError")
    assert not of_type(commands, TerminateRuntime)  # it is gone already
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)
    assert env.phase is Phase.UNINITIALIZED


def test_runtime_killed_for_memory_is_out_of_memory() -> None:
    env = Env()
    env.cold_invoke()
    commands = env.at(0.5).do(ProcessExited(None, -9, oom_kills=1))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Runtime.OutOfMemory"
    assert outcome.message.endswith("Runtime exited with error: signal: killed")
    assert one(commands, FinishInvoke).error_type == "Runtime.OutOfMemory"
    assert one(commands, FinishShutdown).reason == "failure"


def test_runtime_crash_after_the_response_does_not_answer_twice() -> None:
    env = Env()
    env.cold_invoke()
    env.at(0.5).respond()
    commands = env.at(0.75).do(ProcessExited(None, 1))

    assert not of_type(commands, Respond)
    assert one(commands, FinishInvoke).status == "failure"
    assert env.phase is Phase.UNINITIALIZED


def test_runtime_crash_during_init_fails_the_pending_invoke() -> None:
    env = Env()
    env.do(InvokeRequested(invoke()))
    commands = env.at(0.5).do(ProcessExited(None, 2))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Runtime.ExitError"
    assert "exit status 2" in outcome.message
    assert record(commands, "platform.initRuntimeDone")["status"] == "error"
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)


def test_runtime_crash_between_invokes_resets_the_environment() -> None:
    env = Env().warm()
    commands = env.at(3.0).do(ProcessExited(None, 1))

    assert of_type(commands, Thaw)  # a frozen environment is thawed before it is torn down
    assert not of_type(commands, Respond)
    assert not of_type(commands, FinishInvoke)
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)
    assert env.phase is Phase.UNINITIALIZED


def test_init_error_is_returned_to_the_pending_invoke_and_resets() -> None:
    env = Env()
    env.do(InvokeRequested(invoke()))
    body = b'{"errorType": "Runtime.ImportModuleError", "errorMessage": "No module named app"}'
    commands = env.at(0.5).do(InitErrorPosted("Runtime.ImportModuleError", body))

    assert one(commands, Respond) == Respond("req-1", FunctionFailure(body, "Runtime.ImportModuleError"))
    done = record(commands, "platform.initRuntimeDone")
    assert (done["status"], done["errorType"]) == ("error", "Runtime.ImportModuleError")
    report = record(commands, "platform.initReport")
    assert report["status"] == "error"
    assert report["metrics"] == {"durationMs": 500.0}
    finish = one(commands, FinishInvoke)
    assert (finish.request_id, finish.status, finish.error_type) == ("req-1", "error", "Runtime.ImportModuleError")
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)
    assert env.phase is Phase.UNINITIALIZED

    commands = env.at(2.0).do(InvokeRequested(invoke("req-2")))
    assert platform(commands, "platform.initStart")
    assert of_type(commands, StartRuntime)


def test_init_times_out_after_ten_seconds() -> None:
    env = Env()
    commands = env.do(InvokeRequested(invoke()))
    assert ArmTimer(Timer.INIT, T0 + 10.0) in commands

    commands = env.at(10.0).do(DeadlinePassed(Timer.INIT))
    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Sandbox.Timedout"
    assert outcome.message.endswith("Init timed out after 10.00 seconds")
    report = record(commands, "platform.initReport")
    assert (report["status"], report["errorType"]) == ("error", "Sandbox.Timedout")
    assert report["metrics"] == {"durationMs": 10000.0}
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)
    assert env.phase is Phase.UNINITIALIZED


# ---- shutdown ------------------------------------------------------------------------------------------------------


def test_shutdown_without_extensions_kills_at_once() -> None:
    env = Env().warm()
    commands = env.at(3.0).do(ShutdownRequested("spindown"))

    assert labels(commands)[0] == "Thaw"
    assert not of_type(commands, TerminateRuntime)
    assert not [c for c in of_type(commands, ArmTimer) if c.timer in (Timer.SHUTDOWN, Timer.RUNTIME_SHUTDOWN)]
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)
    assert_order(commands, "KillAll", "FinishShutdown")
    assert env.phase is Phase.GONE


def test_shutdown_before_any_init_finishes_at_once() -> None:
    env = Env()
    commands = env.do(ShutdownRequested("spindown"))
    assert commands == [FinishShutdown("spindown", reset=False)]
    assert env.phase is Phase.GONE


def test_shutdown_during_invoke_fails_the_invoke() -> None:
    env = Env()
    env.cold_invoke()
    commands = env.at(0.5).do(ShutdownRequested("spindown"))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Sandbox.Shutdown"
    assert one(commands, FinishInvoke).status == "failure"
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)
    assert env.phase is Phase.GONE


def ready_with(env: Env, external: tuple[str, ...] = (), internal: tuple[str, ...] = ()) -> Env:
    """Init ahead of any invoke: externals register (all for INVOKE and SHUTDOWN), the runtime starts, internals
    register (INVOKE only), then everyone calls /next. The environment ends READY and frozen."""
    env.do(InitRequested())
    for name in external:
        env.register(name)
    for name in internal:
        env.register(name, ("INVOKE",))
    env.at(0.5).do(RuntimeRequestedNext())
    for name in external + internal:
        env.ext_next(name)
    assert env.phase is Phase.READY
    return env


def test_shutdown_with_external_extensions_gives_two_seconds_and_the_runtime_300_ms() -> None:
    env = ready_with(Env(extensions=("ext",)), external=("ext",))
    commands = env.at(3.0).do(ShutdownRequested("spindown"))

    assert budget(commands, Timer.SHUTDOWN, env.now) == pytest.approx(2.0, abs=1e-6)
    assert budget(commands, Timer.RUNTIME_SHUTDOWN, env.now) == pytest.approx(0.3, abs=1e-6)
    assert of_type(commands, TerminateRuntime)
    assert not of_type(commands, DeliverExtensionEvent)  # SHUTDOWN waits until the runtime is gone
    assert not of_type(commands, KillAll)
    assert_order(commands, "Thaw", "TerminateRuntime")
    assert env.phase is Phase.SHUTDOWN


def test_runtime_that_ignores_sigterm_is_killed_at_its_share_then_extensions_get_shutdown() -> None:
    env = ready_with(Env(extensions=("ext",)), external=("ext",))
    env.at(3.0).do(ShutdownRequested("spindown"))
    commands = env.at(3.25).do(DeadlinePassed(Timer.RUNTIME_SHUTDOWN))

    assert Kill(None) in commands
    event = one(commands, DeliverExtensionEvent)
    assert event.identifier == "id-ext"
    assert event.event == {"eventType": "SHUTDOWN", "shutdownReason": "spindown", "deadlineMs": 1_700_000_005_000}
    assert_order(commands, "Kill", "DeliverExtensionEvent")
    assert not of_type(commands, FinishShutdown)

    assert env.at(3.5).do(ProcessExited(None, -9)) == []  # the extension still has time


def test_whatever_is_alive_at_the_shutdown_deadline_is_killed() -> None:
    env = ready_with(Env(extensions=("ext",)), external=("ext",))
    env.at(3.0).do(ShutdownRequested("spindown"))
    env.at(3.25).do(ProcessExited(None, -15))
    env.ext_next("ext")  # the extension took SHUTDOWN and asks again instead of exiting
    commands = env.at(5.0).do(DeadlinePassed(Timer.SHUTDOWN))

    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)
    assert env.phase is Phase.GONE


def test_shutdown_ends_when_the_last_shutdown_extension_exits() -> None:
    env = ready_with(Env(extensions=("a", "b")), external=("a", "b"))
    env.at(3.0).do(ShutdownRequested("spindown"))
    commands = env.at(3.25).do(ProcessExited(None, -15))
    assert {e.identifier for e in of_type(commands, DeliverExtensionEvent)} == {"id-a", "id-b"}

    assert not of_type(env.at(3.5).do(ProcessExited("a", 0)), FinishShutdown)
    commands = env.at(3.75).do(ProcessExited("b", 0))
    assert CancelTimer(Timer.SHUTDOWN) in commands
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)


def test_shutdown_with_only_an_internal_extension_gives_500_ms() -> None:
    env = ready_with(Env(), internal=("agent",))
    commands = env.at(3.0).do(ShutdownRequested("spindown"))

    assert budget(commands, Timer.SHUTDOWN, env.now) == pytest.approx(0.5, abs=1e-6)
    assert budget(commands, Timer.RUNTIME_SHUTDOWN, env.now) == pytest.approx(0.5, abs=1e-6)
    assert of_type(commands, TerminateRuntime)

    commands = env.at(3.25).do(ProcessExited(None, -15))
    assert not of_type(commands, DeliverExtensionEvent)  # an internal extension cannot take SHUTDOWN
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)


def test_shutdown_with_external_and_internal_extensions_gives_the_runtime_500_ms() -> None:
    env = ready_with(Env(extensions=("ext",)), external=("ext",), internal=("agent",))
    commands = env.at(3.0).do(ShutdownRequested("spindown"))

    assert budget(commands, Timer.SHUTDOWN, env.now) == pytest.approx(2.0, abs=1e-6)
    assert budget(commands, Timer.RUNTIME_SHUTDOWN, env.now) == pytest.approx(0.5, abs=1e-6)


def test_shutdown_requested_during_a_reset_makes_it_final() -> None:
    env = Env(timeout_s=1.0, extensions=("ext",))
    env.do(InvokeRequested(invoke()))
    env.register("ext")
    env.at(0.25).do(RuntimeRequestedNext())
    env.ext_next("ext")
    env.at(1.25).do(DeadlinePassed(Timer.INVOKE))  # a reset begins
    assert env.at(1.3).do(ShutdownRequested("spindown")) == []
    env.at(1.5).do(ProcessExited(None, -15))
    commands = env.at(1.75).do(ProcessExited("ext", 0))
    assert one(commands, FinishShutdown).reset is False
    assert env.phase is Phase.GONE


def test_a_late_runtime_share_deadline_after_the_runtime_exited_is_ignored() -> None:
    env = ready_with(Env(extensions=("ext",)), external=("ext",))
    env.at(3.0).do(ShutdownRequested("spindown"))
    env.at(3.25).do(ProcessExited(None, -15))
    commands = env.at(3.3).do(DeadlinePassed(Timer.RUNTIME_SHUTDOWN))
    assert not of_type(commands, Kill)
    assert not of_type(commands, DeliverExtensionEvent)  # SHUTDOWN is not sent twice
    assert env.phase is Phase.SHUTDOWN


def test_shutdown_during_init_answers_the_waiting_invoke() -> None:
    env = Env()
    env.do(InvokeRequested(invoke()))
    commands = env.at(0.5).do(ShutdownRequested("spindown"))

    assert [r.request_id for r in of_type(commands, Respond)] == ["req-1"]


def test_a_gone_environment_refuses_invokes() -> None:
    env = Env().warm()
    env.at(3.0).do(ShutdownRequested())
    assert denied(env, InvokeRequested(invoke("req-9"))).status == 403
    assert env.at(4.0).do(ShutdownRequested()) == []


# ---- denied and ignored facts --------------------------------------------------------------------------------------


def test_response_for_an_unknown_request_id_is_400() -> None:
    env = Env()
    env.cold_invoke()
    error = denied(env, ResponsePosted("req-other", b"{}", "application/json", env.now))
    assert error.status == 400
    assert error.error_type == "InvalidRequestID"
    assert env.phase is Phase.INVOKE
    assert env.respond() == [Respond("req-1", Response(b'{"ok": true}', "application/json"))]


def test_a_second_response_is_403() -> None:
    env = Env()
    env.cold_invoke()
    env.at(0.5).respond()
    assert denied(env, ResponsePosted("req-1", b"{}", "application/json", env.now)).status == 403
    assert denied(env, ErrorPosted("req-1", "Oops", b"{}")).status == 403


def test_a_fact_not_in_the_table_is_403() -> None:
    env = Env().warm()
    error = denied(env, ResponsePosted("req-0", b"{}", "application/json", env.now))
    assert error.status == 403
    assert error.error_type == "InvalidStateTransition"
    assert env.phase is Phase.READY
    assert denied(Env(), RuntimeRequestedNext()).status == 403  # UNINITIALIZED


def test_runtime_next_before_responding_is_403() -> None:
    env = Env()
    env.cold_invoke()
    assert denied(env, RuntimeRequestedNext()).status == 403
    assert env.phase is Phase.INVOKE


@pytest.mark.parametrize("timer", [Timer.INIT, Timer.INVOKE, Timer.SHUTDOWN, Timer.RUNTIME_SHUTDOWN])
def test_late_deadlines_in_ready_are_ignored(timer: Timer) -> None:
    env = Env().warm()
    assert env.at(9.0).do(DeadlinePassed(timer)) == []
    assert env.phase is Phase.READY


def test_late_init_deadline_during_invoke_is_ignored() -> None:
    env = Env(timeout_s=30.0)
    env.cold_invoke()
    assert env.at(10.0).do(DeadlinePassed(Timer.INIT)) == []
    assert env.phase is Phase.INVOKE


def test_late_invoke_deadline_during_init_is_ignored() -> None:
    env = Env()
    env.do(InvokeRequested(invoke()))
    assert env.at(1.0).do(DeadlinePassed(Timer.INVOKE)) == []
    assert env.phase is Phase.INIT


def test_late_process_exits_after_a_reset_or_shutdown_are_ignored() -> None:
    env = Env()
    env.cold_invoke()
    env.at(1.25).do(DeadlinePassed(Timer.INVOKE))
    assert env.phase is Phase.UNINITIALIZED
    assert env.do(ProcessExited(None, -9)) == []
    assert env.do(DeadlinePassed(Timer.SHUTDOWN)) == []
    assert env.phase is Phase.UNINITIALIZED

    gone = Env().warm()
    gone.at(3.0).do(ShutdownRequested())
    assert gone.do(ProcessExited(None, -9)) == []
    assert gone.do(DeadlinePassed(Timer.SHUTDOWN)) == []
    assert gone.phase is Phase.GONE


# ---- freeze option -------------------------------------------------------------------------------------------------


def test_freeze_off_never_freezes_or_thaws() -> None:
    env = Env(freeze=False)
    env.cold_invoke("req-1")
    env.complete("req-1")
    env.at(5.0).do(InvokeRequested(invoke("req-2")))
    env.complete("req-2")
    env.at(9.0).do(ShutdownRequested())

    assert len(of_type(env.history, FinishInvoke)) == 2
    assert of_type(env.history, FinishShutdown)
    assert not of_type(env.history, Freeze)
    assert not of_type(env.history, Thaw)


def test_freeze_on_freezes_between_invokes() -> None:
    env = Env()
    env.cold_invoke("req-1")
    env.complete("req-1")
    env.at(5.0).do(InvokeRequested(invoke("req-2")))
    env.complete("req-2")

    assert labels([c for c in env.history if isinstance(c, Freeze | Thaw)]) == ["Freeze", "Thaw", "Freeze"]


# ---- resets, inits ahead of demand, faults -------------------------------------------------------------------------


def reset_under_way() -> Env:
    """An environment with one extension whose first invoke timed out at 1.25 s: its reset has begun."""
    env = Env(timeout_s=1.0, extensions=("ext",))
    env.do(InvokeRequested(invoke()))
    env.do(ExtensionRegistered("ext", ("INVOKE", "SHUTDOWN"), "id-ext"))
    env.at(0.25).do(RuntimeRequestedNext())
    env.do(ExtensionRequestedNext("id-ext"))
    env.at(1.25).do(DeadlinePassed(Timer.INVOKE))
    return env


def test_an_invoke_that_arrives_during_a_reset_waits_for_it_and_starts_the_next_init() -> None:
    env = reset_under_way()
    assert env.phase is Phase.SHUTDOWN

    assert env.at(1.3).do(InvokeRequested(invoke("req-2"))) == []  # queued, not refused
    with pytest.raises(ApiError) as caught:
        env.do(InvokeRequested(invoke("req-3")))  # only one may wait, as during an Init
    assert (caught.value.status, caught.value.error_type) == (429, "TooManyRequestsException")

    env.at(1.4).do(ProcessExited(None, -15))
    commands = env.at(1.5).do(ProcessExited("ext", 0))
    assert_order(commands, "KillAll", "FinishShutdown", "platform.initStart", "StartExtension")
    assert env.phase is Phase.INIT
    env.do(ExtensionRegistered("ext", ("INVOKE",), "id-ext-2"))
    env.at(1.7).do(RuntimeRequestedNext())
    commands = env.do(ExtensionRequestedNext("id-ext-2"))
    assert one(commands, DeliverInvoke).invoke.request_id == "req-2"


def test_an_init_ahead_of_demand_is_not_reported_on_the_first_invoke() -> None:
    env = Env()
    env.do(InitRequested("provisioned-concurrency"))
    commands = env.at(0.5).do(RuntimeRequestedNext())
    assert record(commands, "platform.initReport")["metrics"]["durationMs"] == pytest.approx(500.0)
    env.at(10.0).do(InvokeRequested(invoke()))
    env.respond()
    commands = env.at(10.5).do(RuntimeRequestedNext())
    assert one(commands, FinishInvoke).init_duration_ms is None


def test_an_init_an_invoke_waits_for_is_reported_even_in_a_provisioned_environment() -> None:
    env = Env()
    env.do(InitRequested("provisioned-concurrency"))
    env.at(0.5).do(RuntimeRequestedNext())
    env.at(10.0).do(InvokeRequested(invoke("req-1")))
    commands = env.at(10.25).do(ProcessExited(None, 1))  # the runtime crashes: the environment is reset
    assert one(commands, FinishInvoke).init_duration_ms is None  # its init was ahead of demand
    assert env.phase is Phase.UNINITIALIZED
    commands = env.at(20.0).do(InvokeRequested(invoke("req-2")))  # so this invoke waits for a new init
    assert record(commands, "platform.initStart")["initializationType"] == "provisioned-concurrency"
    env.at(20.3).do(RuntimeRequestedNext())
    env.respond("req-2")
    commands = env.at(20.5).do(RuntimeRequestedNext())
    assert one(commands, FinishInvoke).init_duration_ms == pytest.approx(300.0)


def test_a_crash_during_an_invoke_is_a_platform_fault_but_a_timeout_is_not() -> None:
    env = Env()
    env.cold_invoke()
    commands = env.at(0.5).do(ProcessExited(None, 1))
    (fault,) = [c.record for c in of_type(commands, EmitPlatformEvent) if c.type == "platform.fault"]
    assert fault == "RequestId: req-1 Error: Runtime exited with error: exit status 1\nRuntime.ExitError"
    assert_order(commands, "platform.fault", "platform.runtimeDone", "FinishInvoke")

    timed_out = Env()
    timed_out.cold_invoke()
    commands = timed_out.at(2.0).do(DeadlinePassed(Timer.INVOKE))
    assert not [c for c in of_type(commands, EmitPlatformEvent) if c.type == "platform.fault"]


def test_a_reset_turned_into_the_final_shutdown_answers_the_invoke_waiting_for_it() -> None:
    env = reset_under_way()
    env.at(1.3).do(InvokeRequested(invoke("req-2")))  # waits for the next Init
    commands = env.at(1.35).do(ShutdownRequested())
    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure) and outcome.error_type == "Sandbox.Shutdown"
    assert one(commands, FinishInvoke).request_id == "req-2"
    env.at(1.4).do(ProcessExited(None, -15))
    commands = env.at(1.5).do(ProcessExited("ext", 0))
    assert one(commands, FinishShutdown) == FinishShutdown("timeout", reset=False)
    assert env.phase is Phase.GONE


def test_the_runtime_cannot_ask_for_an_event_before_it_is_started() -> None:
    env = Env(extensions=("ext",))
    env.do(InvokeRequested(invoke()))
    assert env.lc.state is State.EXTENSION_INIT  # the runtime starts once every extension has registered
    error = denied(env, RuntimeRequestedNext())
    assert (error.status, error.error_type) == (403, "InvalidStateTransition")
