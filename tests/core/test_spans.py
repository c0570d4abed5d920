"""The core's ``lambdabox.*`` marks, the moments a timeline is drawn from: when each process started, asked for its
next event, was handed one, answered, was signalled and exited, each at the ``now`` passed in. No event loop."""

from __future__ import annotations

from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.facts import (
    Command,
    DeadlinePassed,
    EmitPlatformEvent,
    ErrorPosted,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    FinishInvoke,
    InitErrorPosted,
    InitRequested,
    Invoke,
    InvokeRequested,
    ProcessExited,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    Timer,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.state import Settings

T0 = 1_700_000_000.0  # steps are multiples of 1/8 s: every sum below is exact in binary
RUNTIME = {"process": "runtime"}


def ext(name: str) -> dict[str, str]:
    return {"process": "extension", "name": name}


class Env:
    """A lifecycle with marks on, driven fact by fact at explicit times (seconds after T0)."""

    def __init__(self, extensions: tuple[str, ...] = (), *, marks: bool = True, timeout_s: float = 1.0) -> None:
        self.lc = Lifecycle(Settings("fn", "$LATEST", timeout_s, extensions, marks=marks))
        self.history: list[Command] = []

    def at(self, seconds: float, fact: Fact) -> list[tuple[str, dict[str, Any], float]]:
        """Handle ``fact`` at T0 + seconds; the marks it produced as (type, record, seconds after T0)."""
        commands = self.lc.handle(fact, T0 + seconds)
        self.history.extend(commands)
        return marks_of(commands)

    def all_marks(self) -> list[tuple[str, dict[str, Any], float]]:
        return marks_of(self.history)


def marks_of(commands: list[Command]) -> list[tuple[str, dict[str, Any], float]]:
    return [
        (c.type, c.record, c.at - T0)
        for c in commands
        if isinstance(c, EmitPlatformEvent) and c.type.startswith("lambdabox.")
    ]


def one(commands: list[Command], kind: type[FinishInvoke]) -> FinishInvoke:
    (found,) = [c for c in commands if isinstance(c, kind)]
    return found


def invoke(request_id: str = "r1") -> Invoke:
    return Invoke(request_id, b"{}", "arn:aws:lambda:us-east-1:123456789012:function:fn", "Root=1-0-0")


def registered(name: str, events: tuple[str, ...] = ("INVOKE", "SHUTDOWN")) -> ExtensionRegistered:
    return ExtensionRegistered(name, events, f"id-{name}")


def next_of(name: str) -> ExtensionRequestedNext:
    return ExtensionRequestedNext(f"id-{name}")


def warm(env: Env, name: str = "ext") -> Env:
    """A cold invoke r1 with one external extension, done: READY at 1.0 s."""
    env.at(0.0, InvokeRequested(invoke()))
    env.at(0.125, registered(name))
    env.at(0.25, RuntimeRequestedNext())
    env.at(0.375, next_of(name))
    env.at(0.5, ResponsePosted("r1", b"{}", "application/json", first_byte_at=T0 + 0.4375))
    env.at(0.625, RuntimeRequestedNext())
    env.at(1.0, next_of(name))
    return env


def test_a_cold_invoke_marks_every_process_start_next_delivery_and_the_response() -> None:
    env = warm(Env(("ext",)))
    assert env.all_marks() == [
        (mark.PROCESS_START, ext("ext"), 0.0),
        (mark.PROCESS_START, RUNTIME, 0.125),  # once every external extension registered
        (mark.NEXT, {**RUNTIME, "phase": "init"}, 0.25),  # runtime init + function init end here
        (mark.NEXT, {**ext("ext"), "phase": "init"}, 0.375),  # the extension's init ends here
        (mark.EVENT_DELIVERED, {**ext("ext"), "eventType": "INVOKE", "requestId": "r1"}, 0.375),
        (mark.RESPONSE, {**RUNTIME, "requestId": "r1", "status": "success", "firstByteAt": T0 + 0.4375}, 0.5),
        (mark.NEXT, {**RUNTIME, "phase": "invoke", "requestId": "r1"}, 0.625),
        (mark.NEXT, {**ext("ext"), "phase": "invoke", "requestId": "r1"}, 1.0),  # its work after the response
        (mark.INVOKE_END, {"requestId": "r1", "status": "success"}, 1.0),
    ]


def test_the_marks_sit_among_lambdas_platform_events_in_the_order_things_happened() -> None:
    env = warm(Env(("ext",)))
    types = [c.type for c in env.history if isinstance(c, EmitPlatformEvent)]
    assert types.index("platform.initStart") < types.index(mark.PROCESS_START)
    assert types.index("platform.extension") < types.index(mark.PROCESS_START, 1 + types.index(mark.PROCESS_START))
    assert types.index(mark.NEXT) < types.index("platform.initReport") < types.index("platform.start")
    assert types.index(mark.RESPONSE) < types.index("platform.runtimeDone") < types.index(mark.INVOKE_END)
    invoke_end = next(c for c in env.history if isinstance(c, EmitPlatformEvent) and c.type == mark.INVOKE_END)
    assert env.history.index(invoke_end) < env.history.index(one(env.history, FinishInvoke))  # before REPORT


def test_the_marks_give_the_invoke_duration_and_the_post_runtime_extensions_duration() -> None:
    env = warm(Env(("ext",)))
    start = next(c.at for c in env.history if isinstance(c, EmitPlatformEvent) and c.type == "platform.start")
    (end,) = [at for type_, _, at in env.all_marks() if type_ == mark.INVOKE_END]
    (runtime_done,) = [at for type_, r, at in env.all_marks() if type_ == mark.NEXT and r.get("phase") == "invoke"][:1]
    assert (T0 + end - start) * 1000 == 625.0  # Duration in REPORT
    assert (end - runtime_done) * 1000 == 375.0  # the post-runtime extensions duration


def test_a_warm_invoke_marks_the_delivery_to_a_waiting_extension_at_the_start() -> None:
    env = warm(Env(("ext",)))
    marks = env.at(2.0, InvokeRequested(invoke("r2")))
    assert (mark.EVENT_DELIVERED, {**ext("ext"), "eventType": "INVOKE", "requestId": "r2"}, 2.0) in marks


def test_a_function_error_is_marked_as_the_runtimes_answer() -> None:
    env = warm(Env(("ext",)))
    env.at(2.0, InvokeRequested(invoke("r2")))
    marks = env.at(2.25, ErrorPosted("r2", "ValueError", b"{}"))
    assert marks == [
        (mark.RESPONSE, {**RUNTIME, "requestId": "r2", "status": "error", "errorType": "ValueError"}, 2.25)
    ]


def test_an_internal_extension_has_no_start_but_its_nexts_and_events_are_marked() -> None:
    env = Env()
    env.at(0.0, InvokeRequested(invoke()))
    env.at(0.125, registered("agent", ("INVOKE",)))
    env.at(0.25, RuntimeRequestedNext())
    marks = env.at(0.375, next_of("agent"))
    assert marks[:2] == [
        (mark.NEXT, {**ext("agent"), "phase": "init"}, 0.375),
        (mark.EVENT_DELIVERED, {**ext("agent"), "eventType": "INVOKE", "requestId": "r1"}, 0.375),
    ]
    assert [r for t, r, _ in env.all_marks() if t == mark.PROCESS_START] == [RUNTIME]


def test_shutdown_marks_sigterm_each_exit_the_shutdown_event_and_the_end() -> None:
    env = Env(("a", "b"))
    env.at(0.0, InitRequested())
    env.at(0.125, registered("a"))
    env.at(0.125, registered("b", ("INVOKE",)))
    env.at(0.25, RuntimeRequestedNext())
    env.at(0.25, next_of("a"))
    env.at(0.25, next_of("b"))
    shutdown = env.at(3.0, ShutdownRequested("spindown"))
    assert shutdown == [
        (mark.SHUTDOWN_START, {"reason": "spindown", "reset": False}, 3.0),
        (mark.SIGNAL, {**RUNTIME, "signal": "SIGTERM"}, 3.0),
    ]
    assert env.at(3.125, ProcessExited(None, -15)) == [
        (mark.PROCESS_EXIT, {**RUNTIME, "returncode": -15, "description": "signal: terminated"}, 3.125),
        (mark.EVENT_DELIVERED, {**ext("a"), "eventType": "SHUTDOWN"}, 3.125),  # b did not register for it
    ]
    assert env.at(3.5, ProcessExited("a", 0)) == [
        (mark.PROCESS_EXIT, {**ext("a"), "returncode": 0, "description": "exit status 0"}, 3.5),
        (mark.SIGNAL, {**ext("b"), "signal": "SIGKILL"}, 3.5),  # still alive when the last SHUTDOWN one is done
        (mark.SHUTDOWN_END, {"reason": "spindown", "reset": False}, 3.5),
    ]


def test_a_runtime_that_ignores_sigterm_is_marked_killed_and_its_reaping_is_not_an_exit() -> None:
    env = warm(Env(("ext",)))
    env.at(3.0, ShutdownRequested("spindown"))
    marks = env.at(3.25, DeadlinePassed(Timer.RUNTIME_SHUTDOWN))
    assert marks == [
        (mark.SIGNAL, {**RUNTIME, "signal": "SIGKILL"}, 3.25),
        (mark.EVENT_DELIVERED, {**ext("ext"), "eventType": "SHUTDOWN"}, 3.25),
    ]
    assert env.at(3.375, ProcessExited(None, -9)) == []


def test_what_is_alive_at_the_shutdown_deadline_is_marked_killed() -> None:
    env = warm(Env(("ext",)))
    env.at(3.0, ShutdownRequested("spindown"))
    env.at(3.125, ProcessExited(None, 0))
    marks = env.at(5.0, DeadlinePassed(Timer.SHUTDOWN))
    assert marks == [
        (mark.SIGNAL, {**ext("ext"), "signal": "SIGKILL"}, 5.0),
        (mark.SHUTDOWN_END, {"reason": "spindown", "reset": False}, 5.0),
    ]


def test_a_shutdown_without_extensions_kills_the_runtime_at_once() -> None:
    env = Env()
    env.at(0.0, InitRequested())
    env.at(0.25, RuntimeRequestedNext())
    assert env.at(1.0, ShutdownRequested("spindown")) == [
        (mark.SHUTDOWN_START, {"reason": "spindown", "reset": False}, 1.0),
        (mark.SIGNAL, {**RUNTIME, "signal": "SIGKILL"}, 1.0),
        (mark.SHUTDOWN_END, {"reason": "spindown", "reset": False}, 1.0),
    ]


def test_an_extension_busy_past_a_timeout_gets_shutdown_when_it_asks_again() -> None:
    env = Env(("ext",))
    env.at(0.0, InvokeRequested(invoke()))
    env.at(0.125, registered("ext"))
    env.at(0.25, RuntimeRequestedNext())
    env.at(0.25, next_of("ext"))
    timeout = env.at(1.25, DeadlinePassed(Timer.INVOKE))
    assert [t for t, _, _ in timeout] == [mark.INVOKE_END, mark.SHUTDOWN_START, mark.SIGNAL]
    assert timeout[0][1] == {"requestId": "r1", "status": "timeout", "errorType": "Sandbox.Timedout"}
    exited = env.at(1.375, ProcessExited(None, -15))
    assert [t for t, _, _ in exited] == [mark.PROCESS_EXIT]  # no SHUTDOWN yet: the extension still holds its INVOKE
    marks = env.at(1.5, next_of("ext"))
    assert marks == [
        (mark.NEXT, {**ext("ext"), "phase": "shutdown"}, 1.5),
        (mark.EVENT_DELIVERED, {**ext("ext"), "eventType": "SHUTDOWN"}, 1.5),
    ]


def test_a_runtime_crash_during_the_invoke_is_marked_with_lambdas_wording() -> None:
    env = warm(Env(("ext",)))
    env.at(2.0, InvokeRequested(invoke("r2")))
    marks = env.at(2.25, ProcessExited(None, 1))
    assert marks[0] == (mark.PROCESS_EXIT, {**RUNTIME, "returncode": 1, "description": "exit status 1"}, 2.25)
    assert marks[1] == (
        mark.INVOKE_END,
        {"requestId": "r2", "status": "failure", "errorType": "Runtime.ExitError"},
        2.25,
    )
    assert marks[2] == (mark.SHUTDOWN_START, {"reason": "failure", "reset": True}, 2.25)


def test_an_init_error_ends_the_waiting_invoke_and_a_reset_starts_over() -> None:
    env = Env()
    env.at(0.0, InvokeRequested(invoke()))
    marks = env.at(0.5, InitErrorPosted("Runtime.ImportModuleError", b"{}"))
    assert marks[0] == (
        mark.INVOKE_END,
        {"requestId": "r1", "status": "error", "errorType": "Runtime.ImportModuleError"},
        0.5,
    )
    assert marks[1] == (mark.SHUTDOWN_START, {"reason": "failure", "reset": True}, 0.5)
    assert marks[-1] == (mark.SHUTDOWN_END, {"reason": "failure", "reset": True}, 0.5)


def test_shutdown_while_an_invoke_waits_for_init_ends_that_invoke() -> None:
    env = Env(("ext",))
    env.at(0.0, InvokeRequested(invoke()))
    marks = env.at(0.25, ShutdownRequested("spindown"))
    assert marks[0] == (
        mark.INVOKE_END,
        {"requestId": "r1", "status": "failure", "errorType": "Sandbox.Shutdown"},
        0.25,
    )
    assert marks[1][0] == mark.SHUTDOWN_START


def test_marks_are_off_unless_asked_for() -> None:
    env = warm(Env(("ext",), marks=False))
    env.at(3.0, ShutdownRequested("spindown"))
    env.at(3.125, ProcessExited(None, 0))
    env.at(3.25, ProcessExited("ext", 0))
    types = {c.type for c in env.history if isinstance(c, EmitPlatformEvent)}
    assert types and not any(t.startswith("lambdabox.") for t in types)


def test_every_mark_type_is_in_lambdaboxs_own_namespace() -> None:
    names = [mark.PROCESS_START, mark.NEXT, mark.EVENT_DELIVERED, mark.RESPONSE, mark.INVOKE_END]
    names += [mark.SHUTDOWN_START, mark.SIGNAL, mark.PROCESS_EXIT, mark.SHUTDOWN_END]
    assert all(n.startswith("lambdabox.") for n in names) and len(set(names)) == len(names)
