"""The lifecycle of one Lambda execution environment as a pure, synchronous state machine.

Theory of operation. The shell feeds facts in (``handle(fact, now)``) and carries the returned commands out, in
order. ``now`` is epoch seconds supplied by the shell; nothing here reads a clock or touches a socket.

    UNINITIALIZED --InitRequested/InvokeRequested--> INIT --(runtime and every extension called /next)--> READY
    READY --InvokeRequested--> INVOKE --(runtime and every INVOKE extension called /next again)--> READY
    INIT/INVOKE --(timeout, crash, init error)--> SHUTDOWN(reset) --(all processes gone)--> UNINITIALIZED
    any --ShutdownRequested--> SHUTDOWN --(all processes gone)--> GONE

Init: external extensions start first; the runtime starts once every one of them has registered (the Extension
init sub-phase). Invoke: the runtime gets the event and every extension registered for INVOKE gets an INVOKE event;
the caller gets the response as soon as the runtime posts it; the function timeout bounds the whole phase.
Shutdown: SIGTERM to the runtime (its share of the budget), then SHUTDOWN to the extensions registered for it,
then SIGKILL for whatever is left at the deadline (0 / 500 / 2000 ms, CONTRACT.md section 3).

Transitions are a table keyed by (phase, fact type); anything not in the table is denied with an ApiError.

Marks. With ``Settings.marks`` on, the core also emits ``lambdabox.*`` events (listed in :mod:`facts`) at the moments a
timeline needs: a process started, asked for its next event, was handed one, answered, was signalled, exited.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.errors import ApiError
from lambdabox.core.extensions import Extension, ExtensionRegistry, ExtensionState
from lambdabox.core.facts import (
    ArmTimer,
    CancelTimer,
    Command,
    DeadlinePassed,
    DeliverExtensionEvent,
    DeliverInvoke,
    EmitPlatformEvent,
    ErrorPosted,
    ExtensionErrorPosted,
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
from lambdabox.core.model import FunctionFailure, LambdaFailure, Outcome, Response

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
class _Invocation:
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


def exit_description(returncode: int) -> str:
    """Lambda's wording for how a process ended ("exit status 1", "signal: killed")."""
    if returncode >= 0:
        return f"exit status {returncode}"
    names = {9: "killed", 15: "terminated", 11: "segmentation fault", 6: "aborted"}
    return f"signal: {names.get(-returncode, str(-returncode))}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _who(name: str | None) -> dict[str, str]:
    """How a mark names a process: ``name`` is an extension's, None the runtime."""
    return {"process": "runtime"} if name is None else {"process": "extension", "name": name}


class Lifecycle:
    """One execution environment's lifecycle. ``handle`` is the only entry point."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.phase = Phase.UNINITIALIZED
        self.registry = ExtensionRegistry(settings.extensions)
        self._cmds: list[Command] = []
        self._alive: set[str | None] = set()  # processes started and not yet exited (None is the runtime)
        self._runtime_waiting = False
        self._init_type = "on-demand"
        self._init_started_at = 0.0
        self._init_duration_ms: float | None = None
        self._pending: Invoke | None = None
        self._invocation: _Invocation | None = None
        self._shutdown_reason = ""
        self._reset = False
        self._frozen = False
        self._runtime_stage = False  # shutdown: waiting for the runtime to exit
        self._shutdown_deadline = 0.0

    # ---- entry point ---------------------------------------------------------------------------------------

    def handle(self, fact: Fact, now: float) -> list[Command]:
        handler = _TABLE.get((self.phase, type(fact)))
        if handler is None:
            raise ApiError(
                403, "InvalidStateTransition", f"{type(fact).__name__} is not allowed in phase {self.phase.value}"
            )
        self._cmds = []
        handler(self, fact, now)
        return self._cmds

    @property
    def current_request_id(self) -> str | None:
        return self._invocation.invoke.request_id if self._invocation else None

    def _emit(self, now: float, type_: str, **record: Any) -> None:
        self._cmds.append(EmitPlatformEvent(type_, record, now))

    def _mark(self, now: float, type_: str, name: str | None, **record: Any) -> None:
        """A ``lambdabox.*`` event about one process (``name`` None: the runtime), if marks are on."""
        if self.settings.marks:
            self._cmds.append(EmitPlatformEvent(type_, {**_who(name), **record}, now))

    def _mark_phase(self, now: float, type_: str, **record: Any) -> None:
        """A ``lambdabox.*`` event about the whole environment, if marks are on."""
        if self.settings.marks:
            self._cmds.append(EmitPlatformEvent(type_, record, now))

    def _mark_invoke_end(self, now: float, request_id: str, status: str, error_type: str | None) -> None:
        """Before FinishInvoke, whose platform.report (and REPORT line) the shell emits on carrying it out."""
        error = {"errorType": error_type} if error_type else {}
        self._mark_phase(now, mark.INVOKE_END, requestId=request_id, status=status, **error)

    # ---- init -------------------------------------------------------------------------------------------------

    def _on_init(self, fact: InitRequested, now: float) -> None:
        self._begin_init(now, fact.initialization_type)

    def _on_invoke_uninitialized(self, fact: InvokeRequested, now: float) -> None:
        self._pending = fact.invoke
        self._begin_init(now, self._init_type)

    def _on_invoke_during_init(self, fact: InvokeRequested, now: float) -> None:
        if self._pending is not None:
            raise ApiError(429, "TooManyRequestsException", "the environment already has an invoke waiting")
        self._pending = fact.invoke

    def _begin_init(self, now: float, initialization_type: str) -> None:
        self.phase = Phase.INIT
        self._init_type = initialization_type
        self._init_started_at = now
        self.registry = ExtensionRegistry(self.settings.extensions)
        self._cmds.append(ArmTimer(Timer.INIT, now + INIT_TIMEOUT_S))
        self._emit(
            now,
            "platform.initStart",
            initializationType=initialization_type,
            phase="init",
            functionName=self.settings.function_name,
            functionVersion=self.settings.version,
        )
        for name in self.settings.extensions:
            self._alive.add(name)
            self._cmds.append(StartExtension(name))
            self._mark(now, mark.PROCESS_START, name)
        self._maybe_start_runtime(now)

    def _maybe_start_runtime(self, now: float) -> None:
        if None not in self._alive and self.registry.all_external_registered() and self.phase is Phase.INIT:
            self._alive.add(None)
            self._cmds.append(StartRuntime(self._init_type))
            self._mark(now, mark.PROCESS_START, None)

    def _on_register(self, fact: ExtensionRegistered, now: float) -> None:
        extension = self.registry.register(fact.name, fact.events, fact.identifier, runtime_started=None in self._alive)
        self._emit(now, "platform.extension", name=extension.name, state="Ready", events=sorted(extension.events))
        self._maybe_start_runtime(now)

    def _on_runtime_next_init(self, fact: RuntimeRequestedNext, now: float) -> None:
        self._runtime_waiting = True
        self._mark(now, mark.NEXT, None, phase="init")
        self._maybe_finish_init(now)

    def _on_extension_next_init(self, fact: ExtensionRequestedNext, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.WAITING
        self._mark(now, mark.NEXT, extension.name, phase="init")
        self._maybe_finish_init(now)

    def _maybe_finish_init(self, now: float) -> None:
        waiting = all(ext.state is ExtensionState.WAITING for ext in self.registry.live())
        if not (self._runtime_waiting and waiting and self.registry.all_external_registered()):
            return
        self._cmds.append(CancelTimer(Timer.INIT))
        duration = _ms(now - self._init_started_at)
        # REPORT shows Init Duration only when the init was part of the invoke's cold start (on demand).
        self._init_duration_ms = duration if self._init_type == "on-demand" else None
        common = {"initializationType": self._init_type, "phase": "init", "status": "success"}
        self._emit(now, "platform.initRuntimeDone", **common)
        self._emit(now, "platform.initReport", **common, metrics={"durationMs": duration})
        self.phase = Phase.READY
        self._go_idle_or_invoke(now)

    def _on_init_error(self, fact: InitErrorPosted, now: float) -> None:
        outcome = FunctionFailure(fact.body, fact.error_type)
        self._fail_init(now, fact.error_type, outcome)

    def _on_extension_error_init(self, fact: ExtensionErrorPosted, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.EXITED
        message = fact.message or f"extension {extension.name} reported {fact.error_type}"
        self._fail_init(now, fact.error_type, LambdaFailure(fact.error_type, message))

    def _fail_init(self, now: float, error_type: str, outcome: Outcome) -> None:
        self._cmds.append(CancelTimer(Timer.INIT))
        duration = _ms(now - self._init_started_at)
        common = {"initializationType": self._init_type, "phase": "init", "status": "error", "errorType": error_type}
        self._emit(now, "platform.initRuntimeDone", **common)
        self._emit(now, "platform.initReport", **common, metrics={"durationMs": duration})
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            self._emit(now, "platform.start", requestId=invoke.request_id, version=self.settings.version)
            self._cmds.append(Respond(invoke.request_id, outcome))
            self._mark_invoke_end(now, invoke.request_id, "error", error_type)
            self._cmds.append(FinishInvoke(invoke.request_id, "error", error_type, 0.0, duration))
        self._begin_shutdown(now, "failure", reset=True)

    def _on_init_deadline(self, fact: DeadlinePassed, now: float) -> None:
        if fact.timer is not Timer.INIT:
            return
        message = f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds"
        self._fail_init(now, "Sandbox.Timedout", LambdaFailure("Sandbox.Timedout", message))

    # ---- invoke -----------------------------------------------------------------------------------------------

    def _go_idle_or_invoke(self, now: float) -> None:
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            self._start_invoke(invoke, now)
        elif self.settings.freeze:
            self._frozen = True
            self._cmds.append(Freeze())

    def _on_invoke_ready(self, fact: InvokeRequested, now: float) -> None:
        if self._frozen:
            self._frozen = False
            self._cmds.append(Thaw())
        self._start_invoke(fact.invoke, now)

    def _start_invoke(self, invoke: Invoke, now: float) -> None:
        self.phase = Phase.INVOKE
        init_ms, self._init_duration_ms = self._init_duration_ms, None
        self._invocation = _Invocation(invoke, now, init_ms)
        deadline = now + self.settings.timeout_s
        self._cmds.append(ArmTimer(Timer.INVOKE, deadline))
        tracing = {"type": "X-Amzn-Trace-Id", "value": invoke.trace_id}
        self._emit(now, "platform.start", requestId=invoke.request_id, version=self.settings.version, tracing=tracing)
        self._runtime_waiting = False
        self._cmds.append(DeliverInvoke(invoke, deadline))
        event = {
            "eventType": "INVOKE",
            "deadlineMs": int(deadline * 1000),
            "requestId": invoke.request_id,
            "invokedFunctionArn": invoke.invoked_function_arn,
            "tracing": tracing,
        }
        for extension in self.registry.subscribed("INVOKE"):
            self._send(extension.identifier, event, now)

    def _send(self, identifier: str, event: dict[str, Any], now: float) -> None:
        extension = self.registry.get(identifier)
        if extension.state is ExtensionState.WAITING:
            self._deliver(extension, event, now)
        else:
            extension.pending.append(event)

    def _deliver(self, extension: Extension, event: dict[str, Any], now: float) -> None:
        extension.state = ExtensionState.BUSY
        self._cmds.append(DeliverExtensionEvent(extension.identifier, event))
        extra = {"requestId": event["requestId"]} if "requestId" in event else {}
        self._mark(now, mark.EVENT_DELIVERED, extension.name, eventType=event["eventType"], **extra)

    def _check_request_id(self, request_id: str) -> _Invocation:
        invocation = self._invocation
        if invocation is None or invocation.invoke.request_id != request_id:
            raise ApiError(400, "InvalidRequestID", f"no invoke in progress has request id {request_id!r}")
        if invocation.responded:
            raise ApiError(403, "InvalidStateTransition", f"invoke {request_id} already has a response")
        return invocation

    def _on_response(self, fact: ResponsePosted, now: float) -> None:
        invocation = self._check_request_id(fact.request_id)
        invocation.responded = True
        invocation.response_at = now
        invocation.first_byte_at = fact.first_byte_at
        invocation.produced_bytes = len(fact.body)
        self._cmds.append(Respond(fact.request_id, Response(fact.body, fact.content_type)))
        first_byte_at = fact.first_byte_at
        self._mark(now, mark.RESPONSE, None, requestId=fact.request_id, status="success", firstByteAt=first_byte_at)

    def _on_error(self, fact: ErrorPosted, now: float) -> None:
        invocation = self._check_request_id(fact.request_id)
        invocation.responded = True
        invocation.response_at = now
        invocation.status, invocation.error_type = "error", fact.error_type
        self._cmds.append(Respond(fact.request_id, FunctionFailure(fact.body, fact.error_type)))
        self._mark(now, mark.RESPONSE, None, requestId=fact.request_id, status="error", errorType=fact.error_type)

    def _on_runtime_next_invoke(self, fact: RuntimeRequestedNext, now: float) -> None:
        invocation = self._invocation
        assert invocation is not None
        if not invocation.responded:
            raise ApiError(403, "InvalidStateTransition", "the runtime asked for the next event before responding")
        self._runtime_waiting = True
        invocation.runtime_done_at = now
        self._mark(now, mark.NEXT, None, phase="invoke", requestId=invocation.invoke.request_id)
        self._emit_runtime_done(invocation, now)
        self._maybe_finish_invoke(now)

    def _emit_runtime_done(self, invocation: _Invocation, now: float) -> None:
        record: dict[str, Any] = {
            "requestId": invocation.invoke.request_id,
            "status": invocation.status,
            "metrics": {"durationMs": _ms(now - invocation.started_at), "producedBytes": invocation.produced_bytes},
            "tracing": {"type": "X-Amzn-Trace-Id", "value": invocation.invoke.trace_id},
        }
        if invocation.error_type:
            record["errorType"] = invocation.error_type
        if invocation.response_at is not None:
            first = invocation.first_byte_at or invocation.response_at
            record["spans"] = [
                _span("responseLatency", invocation.started_at, first),
                _span("responseDuration", first, invocation.response_at),
            ]
        self._emit(now, "platform.runtimeDone", **record)

    def _on_extension_next_invoke(self, fact: ExtensionRequestedNext, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.WAITING
        request_id = self._invocation.invoke.request_id if self._invocation else None
        self._mark(now, mark.NEXT, extension.name, phase="invoke", requestId=request_id)
        self._deliver_pending(extension.identifier, now)
        self._maybe_finish_invoke(now)

    def _deliver_pending(self, identifier: str, now: float) -> None:
        extension = self.registry.get(identifier)
        if extension.pending and extension.state is ExtensionState.WAITING:
            self._deliver(extension, extension.pending.pop(0), now)

    def _maybe_finish_invoke(self, now: float) -> None:
        invocation = self._invocation
        assert invocation is not None
        busy = any(ext.state is not ExtensionState.WAITING for ext in self.registry.subscribed("INVOKE"))
        if not self._runtime_waiting or busy:
            return
        self._cmds.append(CancelTimer(Timer.INVOKE))
        runtime_done = invocation.runtime_done_at or now
        self._finish_invoke(invocation, now, invocation.status, invocation.error_type, _ms(now - runtime_done))
        self.phase = Phase.READY
        self._go_idle_or_invoke(now)

    def _finish_invoke(
        self, invocation: _Invocation, now: float, status: str, error_type: str | None, post: float | None = None
    ) -> None:
        self._invocation = None
        self._mark_invoke_end(now, invocation.invoke.request_id, status, error_type)
        self._cmds.append(
            FinishInvoke(
                invocation.invoke.request_id,
                status,
                error_type,
                _ms(now - invocation.started_at),
                invocation.init_duration_ms,
                post,
            )
        )

    def _fail_invoke(
        self, now: float, status: str, failure: LambdaFailure, *, reason: str | None = None, reset: bool = True
    ) -> None:
        invocation = self._invocation
        assert invocation is not None
        request_id = invocation.invoke.request_id
        failure = LambdaFailure(failure.error_type, f"RequestId: {request_id} Error: {failure.message}")
        if status == "failure":  # the Logs API's record of a fault (Telemetry subscribers do not get it)
            self._cmds.append(EmitPlatformEvent("platform.fault", f"{failure.message}\n{failure.error_type}", now))
        if not invocation.responded:
            invocation.responded = True
            self._cmds.append(Respond(request_id, failure))
        if invocation.runtime_done_at is None:
            invocation.status, invocation.error_type = status, failure.error_type
            self._emit_runtime_done(invocation, now)
        self._finish_invoke(invocation, now, status, failure.error_type)
        reason = reason or ("timeout" if status == "timeout" else "failure")
        self._begin_shutdown(now, reason, reset=reset)

    def _on_invoke_deadline(self, fact: DeadlinePassed, now: float) -> None:
        if fact.timer is not Timer.INVOKE:
            return
        seconds = f"{self.settings.timeout_s:.2f}"
        self._fail_invoke(now, "timeout", LambdaFailure("Sandbox.Timedout", f"Task timed out after {seconds} seconds"))

    def _on_extension_error_invoke(self, fact: ExtensionErrorPosted, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.EXITED
        self._fail_invoke(now, "failure", LambdaFailure(fact.error_type, f"extension {extension.name} failed"))

    # ---- processes that end -----------------------------------------------------------------------------------

    def _on_exit(self, fact: ProcessExited, now: float) -> None:
        if fact.extension in self._alive:  # not one already killed on purpose
            how = exit_description(fact.returncode)
            self._mark(now, mark.PROCESS_EXIT, fact.extension, returncode=fact.returncode, description=how)
        self._alive.discard(fact.extension)
        if fact.extension is not None:
            extension = self.registry.by_name(fact.extension)
            if extension is not None:
                extension.state = ExtensionState.EXITED
        if self.phase is Phase.SHUTDOWN:
            self._advance_shutdown(now)
            return
        failure = self._crash_failure(fact)
        if self.phase is Phase.INIT:
            self._fail_init(now, failure.error_type, failure)
        elif self.phase is Phase.INVOKE:
            self._fail_invoke(now, "failure", failure)
        else:  # READY: a process died between invokes; start over at the next invoke
            self._begin_shutdown(now, "failure", reset=True)

    def _crash_failure(self, fact: ProcessExited) -> LambdaFailure:
        how = exit_description(fact.returncode)
        if fact.out_of_memory:
            return LambdaFailure("Runtime.OutOfMemory", f"Runtime exited with error: {how}")
        if fact.extension is None:
            return LambdaFailure("Runtime.ExitError", f"Runtime exited with error: {how}")
        return LambdaFailure("Extension.Crash", f"Extension {fact.extension} exited with error: {how}")

    # ---- shutdown ---------------------------------------------------------------------------------------------

    def _on_shutdown(self, fact: ShutdownRequested, now: float) -> None:
        if self.phase is Phase.UNINITIALIZED:
            self.phase = Phase.GONE
            self._cmds.append(FinishShutdown(fact.reason, reset=False))
            return
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            failure = LambdaFailure("Sandbox.Shutdown", "the environment was shut down before the invoke started")
            self._emit(now, "platform.start", requestId=invoke.request_id, version=self.settings.version)
            self._cmds.append(Respond(invoke.request_id, failure))
            self._mark_invoke_end(now, invoke.request_id, "failure", failure.error_type)
            self._cmds.append(FinishInvoke(invoke.request_id, "failure", failure.error_type, 0.0, None))
        if self._invocation is not None:
            failure = LambdaFailure("Sandbox.Shutdown", "the environment was shut down during the invoke")
            self._fail_invoke(now, "failure", failure, reason=fact.reason, reset=False)
            return
        self._begin_shutdown(now, fact.reason, reset=False)

    def _on_invoke_during_reset(self, fact: InvokeRequested, now: float) -> None:
        if not self._reset or self._pending is not None:
            raise ApiError(403, "InvalidStateTransition", "the environment is shutting down")
        self._pending = fact.invoke

    def _on_shutdown_again(self, fact: ShutdownRequested, now: float) -> None:
        self._reset = False  # a reset already under way becomes the final shutdown

    def _budget(self) -> tuple[float, float]:
        """(total, runtime's share) in seconds: 2000/300 ms with external extensions, 500/500 with internal."""
        internal = any(not ext.external for ext in self.registry)
        if self.settings.extensions:
            return 2.0, 0.5 if internal else 0.3
        if internal:
            return 0.5, 0.5
        return 0.0, 0.0

    def _begin_shutdown(self, now: float, reason: str, *, reset: bool) -> None:
        if self._frozen:
            self._frozen = False
            self._cmds.append(Thaw())
        self.phase = Phase.SHUTDOWN
        self._shutdown_reason = reason
        self._reset = reset
        self._pending = None
        self._mark_phase(now, mark.SHUTDOWN_START, reason=reason, reset=reset)
        for timer in (Timer.INIT, Timer.INVOKE):
            self._cmds.append(CancelTimer(timer))
        total, runtime_share = self._budget()
        if total == 0.0:
            self._finish_shutdown(now)
            return
        self._cmds.append(ArmTimer(Timer.SHUTDOWN, now + total))
        self._shutdown_deadline = now + total
        if None in self._alive:
            self._runtime_stage = True
            self._cmds.append(TerminateRuntime())
            self._mark(now, mark.SIGNAL, None, signal="SIGTERM")
            self._cmds.append(ArmTimer(Timer.RUNTIME_SHUTDOWN, now + runtime_share))
        else:
            self._send_shutdown_events(now)
            self._advance_shutdown(now)

    def _send_shutdown_events(self, now: float) -> None:
        self._runtime_stage = False
        event = {
            "eventType": "SHUTDOWN",
            "shutdownReason": self._shutdown_reason,
            "deadlineMs": int(self._shutdown_deadline * 1000),
        }
        for extension in self.registry.subscribed("SHUTDOWN"):
            if extension.name in self._alive:
                extension.pending.clear()
                self._send(extension.identifier, event, now)

    def _advance_shutdown(self, now: float) -> None:
        if self._runtime_stage:
            if None in self._alive:
                return
            self._cmds.append(CancelTimer(Timer.RUNTIME_SHUTDOWN))
            self._send_shutdown_events(now)
        waiting_for = [ext for ext in self.registry.subscribed("SHUTDOWN") if ext.name in self._alive]
        if not waiting_for:
            self._finish_shutdown(now)

    def _on_shutdown_deadline(self, fact: DeadlinePassed, now: float) -> None:
        if fact.timer is Timer.RUNTIME_SHUTDOWN and self._runtime_stage:
            self._cmds.append(Kill(None))
            self._mark(now, mark.SIGNAL, None, signal="SIGKILL")
            self._alive.discard(None)
            self._advance_shutdown(now)
        elif fact.timer is Timer.SHUTDOWN:
            self._finish_shutdown(now)

    def _on_extension_next_shutdown(self, fact: ExtensionRequestedNext, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.WAITING
        self._mark(now, mark.NEXT, extension.name, phase="shutdown")
        self._deliver_pending(extension.identifier, now)

    def _finish_shutdown(self, now: float) -> None:
        for timer in (Timer.SHUTDOWN, Timer.RUNTIME_SHUTDOWN):
            self._cmds.append(CancelTimer(timer))
        self._cmds.append(KillAll())
        for name in sorted(self._alive, key=lambda n: (n is not None, n or "")):  # the runtime first
            self._mark(now, mark.SIGNAL, name, signal="SIGKILL")
        self._alive.clear()
        self._runtime_waiting = False
        self._runtime_stage = False
        self.registry = ExtensionRegistry(self.settings.extensions)
        self.phase = Phase.UNINITIALIZED if self._reset else Phase.GONE
        self._mark_phase(now, mark.SHUTDOWN_END, reason=self._shutdown_reason, reset=self._reset)
        self._cmds.append(FinishShutdown(self._shutdown_reason, reset=self._reset))
        if self._reset and self._pending is not None:
            self._begin_init(now, self._init_type)

    def _ignore(self, fact: Fact, now: float) -> None:
        """Late timers, and processes reaped after the phase that started them ended."""


def _span(name: str, start: float, end: float) -> dict[str, Any]:
    return {"name": name, "start": _iso(start), "durationMs": _ms(end - start)}


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def billed_ms(duration_ms: float) -> int:
    """Lambda bills in 1 ms steps, rounding up."""
    return max(1, math.ceil(duration_ms))


P = Phase
_Handler = Callable[[Lifecycle, Any, float], None]
_TABLE: dict[tuple[Phase, type], _Handler] = {
    (P.UNINITIALIZED, InitRequested): Lifecycle._on_init,
    (P.UNINITIALIZED, InvokeRequested): Lifecycle._on_invoke_uninitialized,
    (P.UNINITIALIZED, ShutdownRequested): Lifecycle._on_shutdown,
    (P.UNINITIALIZED, DeadlinePassed): Lifecycle._ignore,
    (P.UNINITIALIZED, ProcessExited): Lifecycle._ignore,
    (P.INIT, InvokeRequested): Lifecycle._on_invoke_during_init,
    (P.INIT, ExtensionRegistered): Lifecycle._on_register,
    (P.INIT, ExtensionRequestedNext): Lifecycle._on_extension_next_init,
    (P.INIT, ExtensionErrorPosted): Lifecycle._on_extension_error_init,
    (P.INIT, RuntimeRequestedNext): Lifecycle._on_runtime_next_init,
    (P.INIT, InitErrorPosted): Lifecycle._on_init_error,
    (P.INIT, ProcessExited): Lifecycle._on_exit,
    (P.INIT, DeadlinePassed): Lifecycle._on_init_deadline,
    (P.INIT, ShutdownRequested): Lifecycle._on_shutdown,
    (P.READY, InvokeRequested): Lifecycle._on_invoke_ready,
    (P.READY, ProcessExited): Lifecycle._on_exit,
    (P.READY, DeadlinePassed): Lifecycle._ignore,
    (P.READY, ShutdownRequested): Lifecycle._on_shutdown,
    (P.INVOKE, ResponsePosted): Lifecycle._on_response,
    (P.INVOKE, ErrorPosted): Lifecycle._on_error,
    (P.INVOKE, RuntimeRequestedNext): Lifecycle._on_runtime_next_invoke,
    (P.INVOKE, ExtensionRequestedNext): Lifecycle._on_extension_next_invoke,
    (P.INVOKE, ExtensionErrorPosted): Lifecycle._on_extension_error_invoke,
    (P.INVOKE, ProcessExited): Lifecycle._on_exit,
    (P.INVOKE, DeadlinePassed): Lifecycle._on_invoke_deadline,
    (P.INVOKE, ShutdownRequested): Lifecycle._on_shutdown,
    (P.SHUTDOWN, ExtensionRequestedNext): Lifecycle._on_extension_next_shutdown,
    (P.SHUTDOWN, RuntimeRequestedNext): Lifecycle._ignore,
    (P.SHUTDOWN, ExtensionErrorPosted): Lifecycle._ignore,
    (P.SHUTDOWN, ProcessExited): Lifecycle._on_exit,
    (P.SHUTDOWN, DeadlinePassed): Lifecycle._on_shutdown_deadline,
    (P.SHUTDOWN, ShutdownRequested): Lifecycle._on_shutdown_again,
    (P.SHUTDOWN, InvokeRequested): Lifecycle._on_invoke_during_reset,
    (P.GONE, ProcessExited): Lifecycle._ignore,
    (P.GONE, DeadlinePassed): Lifecycle._ignore,
    (P.GONE, ShutdownRequested): Lifecycle._ignore,
}
