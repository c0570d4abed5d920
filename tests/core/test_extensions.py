"""Extensions: the registry's rules on their own, then extensions inside the lifecycle (Extension init sub-phase,
INVOKE and SHUTDOWN events, an extension that keeps the invoke open, crashes and errors). No clock, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from core_support import T0, TRACE, of_type, one, platform
from lambdabox.core.errors import ApiError
from lambdabox.core.extensions import MAX_EXTENSIONS, ExtensionRegistry, ExtensionState
from lambdabox.core.facts import (
    Command,
    DeadlinePassed,
    DeliverExtensionEvent,
    DeliverInvoke,
    ExtensionErrorPosted,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    FinishInvoke,
    FinishShutdown,
    Invoke,
    InvokeRequested,
    KillAll,
    ProcessExited,
    Respond,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    StartExtension,
    StartRuntime,
    TerminateRuntime,
    Timer,
)
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import LambdaFailure, Response
from lambdabox.core.state import Phase, Settings

ARN = "arn:aws:lambda:us-east-1:123456789012:function:fn:live"
BOTH = ("INVOKE", "SHUTDOWN")


# ---- helpers -----------------------------------------------------------------------------------------------------


def invoke(request_id: str = "req-1") -> Invoke:
    return Invoke(request_id, b"{}", ARN, TRACE)


def delivered(commands: list[Command]) -> dict[str, dict[str, Any]]:
    """Extension events handed over in this batch, by extension identifier."""
    events = of_type(commands, DeliverExtensionEvent)
    assert len({e.identifier for e in events}) == len(events), "two events for one extension in one batch"
    return {e.identifier: e.event for e in events}


def ident(name: str) -> str:
    return f"id-{name}"


class Env:
    """One execution environment with extensions, driven fact by fact at T0 + ``at(...)`` seconds."""

    def __init__(self, *extensions: str, timeout_s: float = 1.0) -> None:
        self.lc = Lifecycle(Settings("fn", "$LATEST", timeout_s, tuple(extensions), freeze=True))
        self.now = T0

    @property
    def phase(self) -> Phase:
        return self.lc.phase

    def at(self, seconds: float) -> Env:
        self.now = T0 + seconds
        return self

    def do(self, fact: Fact) -> list[Command]:
        return self.lc.handle(fact, self.now)

    def denied(self, fact: Fact) -> ApiError:
        with pytest.raises(ApiError) as caught:
            self.do(fact)
        return caught.value

    def register(self, name: str, events: tuple[str, ...] = BOTH) -> list[Command]:
        return self.do(ExtensionRegistered(name, events, ident(name)))

    def next(self, name: str) -> list[Command]:
        return self.do(ExtensionRequestedNext(ident(name)))

    def runtime_next(self) -> list[Command]:
        return self.do(RuntimeRequestedNext())

    def respond(self, request_id: str = "req-1") -> list[Command]:
        return self.do(ResponsePosted(request_id, b'{"ok": true}', "application/json", first_byte_at=self.now))

    def invoked(self, subscriptions: dict[str, tuple[str, ...]], request_id: str = "req-1") -> list[Command]:
        """Cold invoke at T0: each extension registers with its events, the runtime (0.25 s) and then every
        extension call /next. Returns the last batch, the one that carries the invoke out."""
        self.do(InvokeRequested(invoke(request_id)))
        for name, events in subscriptions.items():
            self.register(name, events)
        self.at(0.25).runtime_next()
        commands: list[Command] = []
        for name in subscriptions:
            commands = self.next(name)
        assert self.phase is Phase.INVOKE
        return commands


# ---- the registry on its own ---------------------------------------------------------------------------------------


def test_registry_tells_external_from_internal_extensions() -> None:
    registry = ExtensionRegistry(["ext"])
    external = registry.register("ext", BOTH, "id-1", runtime_started=False)
    internal = registry.register("agent", ["INVOKE"], "id-2", runtime_started=True)

    assert (external.external, internal.external) == (True, False)
    assert external.events == frozenset(BOTH)
    assert registry.get("id-2") is internal
    assert registry.by_name("ext") is external
    assert registry.by_name("nope") is None
    assert len(registry) == 2


def test_registry_waits_for_every_external_name() -> None:
    registry = ExtensionRegistry(["a", "b"])
    assert not registry.all_external_registered()
    registry.register("a", (), "id-a", runtime_started=False)
    assert not registry.all_external_registered()
    registry.register("b", (), "id-b", runtime_started=False)
    assert registry.all_external_registered()


def test_registry_lists_live_subscribers_only() -> None:
    registry = ExtensionRegistry(["a", "b", "c"])
    registry.register("a", ["INVOKE"], "id-a", runtime_started=False)
    registry.register("b", BOTH, "id-b", runtime_started=False)
    registry.register("c", ["SHUTDOWN"], "id-c", runtime_started=False)
    registry.get("id-b").state = ExtensionState.EXITED

    assert [e.name for e in registry.subscribed("INVOKE")] == ["a"]
    assert [e.name for e in registry.subscribed("SHUTDOWN")] == ["c"]
    assert [e.name for e in registry.live()] == ["a", "c"]


@pytest.mark.parametrize("identifier", ["unknown", "", None])
def test_unknown_identifier_is_403(identifier: str | None) -> None:
    registry = ExtensionRegistry(["ext"])
    registry.register("ext", BOTH, "id-ext", runtime_started=False)
    with pytest.raises(ApiError) as caught:
        registry.get(identifier)
    assert caught.value.status == 403
    assert caught.value.error_type == "Extension.UnknownExtensionIdentifier"


def test_registration_needs_a_name() -> None:
    with pytest.raises(ApiError) as caught:
        ExtensionRegistry(["ext"]).register("", BOTH, "id", runtime_started=False)
    assert caught.value.status == 400


def test_registration_refuses_unknown_event_types() -> None:
    registry = ExtensionRegistry(["ext"])
    with pytest.raises(ApiError) as caught:
        registry.register("ext", ["INVOKE", "RESTORE"], "id", runtime_started=False)
    assert caught.value.status == 400
    assert caught.value.error_type == "Extension.InvalidEventType"
    assert len(registry) == 0


def test_registration_with_no_events_is_allowed() -> None:
    registry = ExtensionRegistry(["ext"])
    assert registry.register("ext", [], "id", runtime_started=False).events == frozenset()


def test_duplicate_name_is_rejected() -> None:
    registry = ExtensionRegistry(["ext"])
    registry.register("ext", BOTH, "id-1", runtime_started=False)
    with pytest.raises(ApiError) as caught:
        registry.register("ext", BOTH, "id-2", runtime_started=False)
    assert 400 <= caught.value.status < 500
    assert len(registry) == 1
    with pytest.raises(ApiError):
        registry.get("id-2")


def test_duplicate_name_is_refused_with_a_status_register_can_return() -> None:
    registry = ExtensionRegistry(["ext"])
    registry.register("ext", BOTH, "id-1", runtime_started=False)
    with pytest.raises(ApiError) as caught:
        registry.register("ext", BOTH, "id-2", runtime_started=False)
    assert caught.value.status in (400, 403)


def test_a_name_outside_opt_extensions_is_refused_before_the_runtime_starts() -> None:
    registry = ExtensionRegistry(["ext"])
    with pytest.raises(ApiError) as caught:
        registry.register("ext.sh", BOTH, "id", runtime_started=False)
    assert caught.value.status == 403
    assert caught.value.error_type == "Extension.UnknownExtension"


def test_internal_extension_cannot_register_for_shutdown() -> None:
    registry = ExtensionRegistry([])
    with pytest.raises(ApiError) as caught:
        registry.register("agent", BOTH, "id", runtime_started=True)
    assert caught.value.status == 400
    assert registry.register("agent", ["INVOKE"], "id", runtime_started=True).external is False


def test_at_most_ten_extensions() -> None:
    names = [f"ext-{i}" for i in range(MAX_EXTENSIONS)]
    registry = ExtensionRegistry(names)
    for name in names:
        registry.register(name, BOTH, f"id-{name}", runtime_started=False)
    with pytest.raises(ApiError) as caught:
        registry.register("agent", ["INVOKE"], "id-agent", runtime_started=True)
    assert MAX_EXTENSIONS == 10
    assert caught.value.error_type == "Extension.TooManyExtensions"
    assert caught.value.status in (400, 403)
    assert len(registry) == 10


# ---- Extension init sub-phase ---------------------------------------------------------------------------------------


def test_external_extensions_start_first_and_the_runtime_waits_for_every_registration() -> None:
    env = Env("a", "b")
    commands = env.do(InvokeRequested(invoke()))
    assert of_type(commands, StartExtension) == [StartExtension("a", 1), StartExtension("b", 1)]  # the first Init
    assert not of_type(commands, StartRuntime)

    commands = env.register("a")
    assert platform(commands, "platform.extension") == [{"name": "a", "state": "Ready", "events": list(BOTH)}]
    assert not of_type(commands, StartRuntime)

    commands = env.register("b", ("INVOKE",))
    assert platform(commands, "platform.extension") == [{"name": "b", "state": "Ready", "events": ["INVOKE"]}]
    assert one(commands, StartRuntime) == StartRuntime("on-demand", 1)


def test_init_ends_only_when_every_extension_called_next() -> None:
    env = Env("a", "b")
    env.do(InvokeRequested(invoke()))
    env.register("a")
    env.register("b")

    assert env.at(0.25).runtime_next() == []
    assert env.at(0.5).next("a") == []
    assert env.phase is Phase.INIT
    commands = env.at(0.75).next("b")

    assert platform(commands, "platform.initReport")[0]["metrics"] == {"durationMs": 750.0}
    assert one(commands, DeliverInvoke).invoke.request_id == "req-1"
    assert env.phase is Phase.INVOKE


def test_extensions_calling_next_before_the_runtime_still_wait_for_it() -> None:
    env = Env("a")
    env.do(InvokeRequested(invoke()))
    env.register("a")
    assert env.next("a") == []
    commands = env.at(0.5).runtime_next()
    assert of_type(commands, DeliverInvoke)
    assert platform(commands, "platform.initReport")[0]["metrics"] == {"durationMs": 500.0}


def test_unknown_identifier_is_403_during_init_and_invoke() -> None:
    env = Env("a")
    env.do(InvokeRequested(invoke()))
    env.register("a")
    assert env.denied(ExtensionRequestedNext("id-nobody")).status == 403
    assert env.denied(ExtensionRequestedNext(None)).status == 403
    env.at(0.25).runtime_next()
    env.next("a")
    assert env.phase is Phase.INVOKE
    assert env.denied(ExtensionRequestedNext("id-nobody")).status == 403


def test_registration_of_an_unlisted_name_before_the_runtime_starts_is_refused() -> None:
    env = Env("a")
    env.do(InvokeRequested(invoke()))
    error = env.denied(ExtensionRegistered("not-in-opt", ("INVOKE",), "id-x"))
    assert error.status == 403
    commands = env.register("a")
    assert of_type(commands, StartRuntime)  # the refused one is not waited for


def test_internal_extension_registers_after_the_runtime_starts_and_holds_init() -> None:
    env = Env()
    commands = env.do(InvokeRequested(invoke()))
    assert of_type(commands, StartRuntime)  # no external extensions: the runtime starts at once

    assert env.denied(ExtensionRegistered("agent", BOTH, "id-agent")).status == 400  # no SHUTDOWN for internals
    commands = env.register("agent", ("INVOKE",))
    assert platform(commands, "platform.extension")[0]["name"] == "agent"

    assert env.at(0.25).runtime_next() == []  # init waits for the internal extension too
    commands = env.at(0.5).next("agent")
    assert of_type(commands, DeliverInvoke)
    assert delivered(commands)["id-agent"]["eventType"] == "INVOKE"


def test_duplicate_name_is_rejected_by_the_lifecycle() -> None:
    env = Env("a")
    env.do(InvokeRequested(invoke()))
    env.register("a")
    error = env.denied(ExtensionRegistered("a", BOTH, "id-a-again"))
    assert 400 <= error.status < 500
    assert env.denied(ExtensionRequestedNext("id-a-again")).status == 403


def test_the_eleventh_extension_is_refused() -> None:
    names = tuple(f"ext-{i}" for i in range(10))
    env = Env(*names)
    env.do(InvokeRequested(invoke()))
    for name in names:
        env.register(name)
    error = env.denied(ExtensionRegistered("agent", ("INVOKE",), "id-agent"))
    assert error.error_type == "Extension.TooManyExtensions"
    assert error.status in (400, 403)


def test_extension_init_error_fails_init_and_resets() -> None:
    env = Env("a", "b")
    env.do(InvokeRequested(invoke()))
    env.register("a")
    env.register("b")
    env.at(0.25).runtime_next()
    env.next("b")  # b is waiting for its first event
    commands = env.at(0.5).do(ExtensionErrorPosted(ident("a"), "Extension.ConfigInvalid", "init", "no API key"))

    outcome = one(commands, Respond).outcome
    assert outcome == LambdaFailure("Extension.ConfigInvalid", "no API key")
    report = platform(commands, "platform.initReport")[0]
    assert (report["status"], report["errorType"]) == ("error", "Extension.ConfigInvalid")
    assert one(commands, FinishInvoke).status == "error"
    assert of_type(commands, TerminateRuntime)
    assert env.phase is Phase.SHUTDOWN

    commands = env.at(0.75).do(ProcessExited(None, -15))
    # only b gets SHUTDOWN: a reported an error and is on its way out
    assert delivered(commands) == {
        "id-b": {"eventType": "SHUTDOWN", "shutdownReason": "failure", "deadlineMs": 1_700_000_002_500}
    }
    commands = env.at(1.0).do(ProcessExited("b", 0))
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)
    assert env.phase is Phase.UNINITIALIZED


def test_extension_crash_during_init_fails_init() -> None:
    env = Env("a")
    env.do(InvokeRequested(invoke()))
    commands = env.at(0.5).do(ProcessExited("a", 1))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Extension.Crash"
    assert one(commands, FinishShutdown) == FinishShutdown("failure", reset=True)


# ---- INVOKE events ---------------------------------------------------------------------------------------------------


def test_invoke_event_goes_only_to_extensions_registered_for_invoke() -> None:
    env = Env("inv", "shut", "both", timeout_s=2.0)
    commands = env.invoked({"inv": ("INVOKE",), "shut": ("SHUTDOWN",), "both": BOTH})

    deliver = one(commands, DeliverInvoke)
    expected = {
        "eventType": "INVOKE",
        "deadlineMs": 1_700_000_002_250,
        "requestId": "req-1",
        "invokedFunctionArn": ARN,
        "tracing": {"type": "X-Amzn-Trace-Id", "value": TRACE},
    }
    events = delivered(commands)
    assert events == {"id-inv": expected, "id-both": expected}
    assert type(events["id-inv"]["deadlineMs"]) is int  # epoch milliseconds, not a float
    assert deliver.deadline * 1000 == expected["deadlineMs"]


def test_busy_extension_keeps_the_invoke_open_after_the_response() -> None:
    env = Env("ext")
    env.invoked({"ext": ("INVOKE",)})  # the invoke starts at T0 + 0.25
    assert env.at(0.5).respond() == [Respond("req-1", Response(b'{"ok": true}', "application/json"))]

    commands = env.at(0.75).runtime_next()
    assert platform(commands, "platform.runtimeDone")[0]["status"] == "success"
    assert not of_type(commands, FinishInvoke)
    assert env.phase is Phase.INVOKE

    commands = env.at(1.0).next("ext")
    finish = one(commands, FinishInvoke)
    assert finish.post_runtime_extensions_ms == 250.0  # from the runtime's /next to the extension's
    assert finish.duration_ms == 750.0
    assert finish.status == "success"
    assert not platform(commands, "platform.runtimeDone")  # reported once, at the runtime's /next
    assert env.phase is Phase.READY


def test_extension_done_before_the_runtime_adds_no_post_runtime_time() -> None:
    env = Env("ext")
    env.invoked({"ext": ("INVOKE",)})
    assert env.at(0.5).next("ext") == []
    env.at(0.75).respond()
    finish = one(env.at(1.0).runtime_next(), FinishInvoke)
    assert finish.post_runtime_extensions_ms == 0.0


def test_shutdown_only_extension_does_not_hold_the_invoke() -> None:
    env = Env("ext")
    env.invoked({"ext": ("SHUTDOWN",)})
    env.at(0.5).respond()
    assert of_type(env.at(0.75).runtime_next(), FinishInvoke)


def test_warm_invoke_sends_a_fresh_invoke_event() -> None:
    env = Env("ext", timeout_s=3.0)
    env.invoked({"ext": ("INVOKE",)}, "req-1")
    env.at(0.5).respond("req-1")
    env.at(0.75).runtime_next()
    env.at(1.0).next("ext")

    commands = env.at(10.0).do(InvokeRequested(invoke("req-2")))
    event = delivered(commands)["id-ext"]
    assert (event["requestId"], event["deadlineMs"]) == ("req-2", 1_700_000_013_000)


def test_timeout_while_only_an_extension_is_busy() -> None:
    env = Env("ext", timeout_s=1.0)
    env.invoked({"ext": BOTH})  # invoke starts at T0 + 0.25, deadline T0 + 1.25
    env.at(0.5).respond()
    env.at(0.75).runtime_next()

    commands = env.at(1.25).do(DeadlinePassed(Timer.INVOKE))
    assert not of_type(commands, Respond)  # the caller already has its response
    assert not platform(commands, "platform.runtimeDone")  # the runtime was done in time
    finish = one(commands, FinishInvoke)
    assert (finish.status, finish.error_type) == ("timeout", "Sandbox.Timedout")
    assert of_type(commands, TerminateRuntime)

    commands = env.at(1.5).do(ProcessExited(None, -15))
    assert delivered(commands) == {}  # still busy with INVOKE: SHUTDOWN is queued
    commands = env.at(1.75).next("ext")
    assert delivered(commands) == {
        "id-ext": {"eventType": "SHUTDOWN", "shutdownReason": "timeout", "deadlineMs": 1_700_000_003_250}
    }
    commands = env.at(2.0).do(ProcessExited("ext", 0))
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("timeout", reset=True)
    assert env.phase is Phase.UNINITIALIZED


def test_extension_crash_during_invoke_is_extension_crash() -> None:
    env = Env("ext", "other")
    env.invoked({"ext": ("INVOKE",), "other": BOTH})
    commands = env.at(0.5).do(ProcessExited("ext", 1))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Extension.Crash"
    assert outcome.message.endswith("Extension ext exited with error: exit status 1")
    assert one(commands, FinishInvoke).status == "failure"
    assert of_type(commands, TerminateRuntime)

    commands = env.at(0.75).do(ProcessExited(None, -15))
    # "other" is busy with INVOKE: its SHUTDOWN waits for its /next
    assert delivered(commands) == {}
    event = delivered(env.next("other"))["id-other"]
    assert (event["eventType"], event["shutdownReason"]) == ("SHUTDOWN", "failure")


def test_extension_exit_error_during_invoke_fails_the_invoke() -> None:
    env = Env("ext")
    env.invoked({"ext": BOTH})
    commands = env.at(0.5).do(ExtensionErrorPosted(ident("ext"), "Extension.Fatal", "exit"))

    outcome = one(commands, Respond).outcome
    assert isinstance(outcome, LambdaFailure)
    assert outcome.error_type == "Extension.Fatal"
    assert one(commands, FinishInvoke).status == "failure"
    assert env.phase is Phase.SHUTDOWN


# ---- SHUTDOWN events -------------------------------------------------------------------------------------------------


def spun_down(env: Env, subscriptions: dict[str, tuple[str, ...]]) -> list[Command]:
    """A finished invoke, then ShutdownRequested("spindown") at T0 + 3 and the runtime's exit at T0 + 3.25.
    Returns the batch of the runtime's exit."""
    env.invoked(subscriptions)
    env.at(0.5).respond()
    env.at(0.75).runtime_next()
    for name, events in subscriptions.items():
        if "INVOKE" in events:
            env.next(name)
    assert env.phase is Phase.READY
    env.at(3.0).do(ShutdownRequested("spindown"))
    return env.at(3.25).do(ProcessExited(None, -15))


def test_spindown_reaches_only_extensions_registered_for_shutdown() -> None:
    env = Env("inv", "shut")
    commands = spun_down(env, {"inv": ("INVOKE",), "shut": ("SHUTDOWN",)})

    events = delivered(commands)
    assert events == {
        "id-shut": {"eventType": "SHUTDOWN", "shutdownReason": "spindown", "deadlineMs": 1_700_000_005_000}
    }
    assert type(events["id-shut"]["deadlineMs"]) is int
    # the INVOKE-only extension is not waited for
    commands = env.at(3.5).do(ProcessExited("shut", 0))
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)
    assert env.phase is Phase.GONE


def test_extension_without_shutdown_is_not_waited_for() -> None:
    env = Env("inv")
    commands = spun_down(env, {"inv": ("INVOKE",)})
    assert delivered(commands) == {}
    assert of_type(commands, KillAll)
    assert one(commands, FinishShutdown) == FinishShutdown("spindown", reset=False)


def test_shutdown_event_waits_until_the_extension_is_in_next() -> None:
    env = Env("ext")
    env.do(InvokeRequested(invoke()))
    env.register("ext")
    env.at(0.25).runtime_next()  # the extension has not called /next yet
    env.at(0.5).do(ShutdownRequested("spindown"))
    commands = env.at(0.75).do(ProcessExited(None, -15))
    assert delivered(commands) == {}

    commands = env.at(1.0).next("ext")
    assert delivered(commands) == {
        "id-ext": {"eventType": "SHUTDOWN", "shutdownReason": "spindown", "deadlineMs": 1_700_000_002_500}
    }
    assert env.at(1.25).next("ext") == []  # nothing else to hand over
    assert one(env.at(1.5).do(ProcessExited("ext", 0)), FinishShutdown).reset is False


def test_unknown_identifier_is_403_during_shutdown() -> None:
    env = Env("ext")
    spun_down(env, {"ext": BOTH})
    assert env.denied(ExtensionRequestedNext("id-nobody")).status == 403


def test_extension_may_report_exit_error_during_shutdown() -> None:
    env = Env("ext")
    spun_down(env, {"ext": BOTH})  # the extension now holds its SHUTDOWN event
    commands = env.at(3.5).do(ExtensionErrorPosted(ident("ext"), "Extension.FlushFailed", "exit"))
    assert not of_type(commands, FinishShutdown)  # it has reported; its exit ends the shutdown
    assert one(env.at(3.75).do(ProcessExited("ext", 1)), FinishShutdown).reason == "spindown"


def test_a_new_init_after_a_reset_needs_the_extensions_to_register_again() -> None:
    env = Env("ext", timeout_s=1.0)
    env.invoked({"ext": BOTH})
    env.at(1.25).do(DeadlinePassed(Timer.INVOKE))  # the runtime never answered
    env.at(1.5).do(ProcessExited(None, -15))
    env.at(1.75).do(ProcessExited("ext", 0))
    assert env.phase is Phase.UNINITIALIZED

    env.at(5.0).do(InvokeRequested(invoke("req-2")))
    assert env.denied(ExtensionRequestedNext(ident("ext"))).status == 403  # the old identifier is gone
    commands = env.do(ExtensionRegistered("ext", BOTH, "id-ext-2"))
    assert of_type(commands, StartRuntime)
