"""The steps of an environment's lifecycle: begin, finish and fail Init and each invoke, hand events to extensions,
and run shutdown's stages; each appends the commands and platform events it issues. The state machine that decides
which step a fact calls for is :class:`lambdabox.core.lifecycle.Lifecycle`."""

from __future__ import annotations

from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.extensions import Extension, ExtensionRegistry, ExtensionState
from lambdabox.core.facts import (
    ArmTimer,
    CancelTimer,
    Command,
    DeliverExtensionEvent,
    DeliverInvoke,
    EmitPlatformEvent,
    FinishInvoke,
    FinishShutdown,
    Freeze,
    Invoke,
    KillAll,
    Respond,
    StartExtension,
    StartRuntime,
    TerminateRuntime,
    Thaw,
    Timer,
)
from lambdabox.core.model import LambdaFailure, Outcome
from lambdabox.core.record import ms, span, who
from lambdabox.core.state import INIT_TIMEOUT_S, Invocation, Phase, Settings


class Steps:
    """The state of one environment and the steps that change it; :class:`Lifecycle` adds the transitions."""

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
        self._invocation: Invocation | None = None
        self._shutdown_reason = ""
        self._reset = False
        self._frozen = False
        self._runtime_stage = False  # shutdown: waiting for the runtime to exit
        self._shutdown_deadline = 0.0

    def _emit(self, now: float, type_: str, **record: Any) -> None:
        self._cmds.append(EmitPlatformEvent(type_, record, now))

    def _mark(self, now: float, type_: str, name: str | None, **record: Any) -> None:
        """A ``lambdabox.*`` event about one process (``name`` None: the runtime), if marks are on."""
        if self.settings.marks:
            self._cmds.append(EmitPlatformEvent(type_, {**who(name), **record}, now))

    def _mark_phase(self, now: float, type_: str, **record: Any) -> None:
        """A ``lambdabox.*`` event about the whole environment, if marks are on."""
        if self.settings.marks:
            self._cmds.append(EmitPlatformEvent(type_, record, now))

    def _mark_invoke_end(self, now: float, request_id: str, status: str, error_type: str | None) -> None:
        """Before FinishInvoke, whose platform.report (and REPORT line) the shell emits on carrying it out."""
        error = {"errorType": error_type} if error_type else {}
        self._mark_phase(now, mark.INVOKE_END, requestId=request_id, status=status, **error)

    # ---- init -------------------------------------------------------------------------------------------------

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

    def _maybe_finish_init(self, now: float) -> None:
        waiting = all(ext.state is ExtensionState.WAITING for ext in self.registry.live())
        if not (self._runtime_waiting and waiting and self.registry.all_external_registered()):
            return
        self._cmds.append(CancelTimer(Timer.INIT))
        duration = ms(now - self._init_started_at)
        # REPORT shows Init Duration when the init was part of an invoke's cold start: on demand, or an init an invoke
        # waited for (in a provisioned environment too, after a reset); not an init ahead of demand.
        on_demand = self._init_type == "on-demand" or self._pending is not None
        self._init_duration_ms = duration if on_demand else None
        common = {"initializationType": self._init_type, "phase": "init", "status": "success"}
        self._emit(now, "platform.initRuntimeDone", **common)
        self._emit(now, "platform.initReport", **common, metrics={"durationMs": duration})
        self.phase = Phase.READY
        self._go_idle_or_invoke(now)

    def _fail_init(self, now: float, error_type: str, outcome: Outcome) -> None:
        self._cmds.append(CancelTimer(Timer.INIT))
        duration = ms(now - self._init_started_at)
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

    # ---- invoke -----------------------------------------------------------------------------------------------

    def _go_idle_or_invoke(self, now: float) -> None:
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            self._start_invoke(invoke, now)
        elif self.settings.freeze:
            self._frozen = True
            self._cmds.append(Freeze())

    def _start_invoke(self, invoke: Invoke, now: float) -> None:
        self.phase = Phase.INVOKE
        init_ms, self._init_duration_ms = self._init_duration_ms, None
        self._invocation = Invocation(invoke, now, init_ms)
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

    def _deliver_pending(self, identifier: str, now: float) -> None:
        extension = self.registry.get(identifier)
        if extension.pending and extension.state is ExtensionState.WAITING:
            self._deliver(extension, extension.pending.pop(0), now)

    def _emit_runtime_done(self, invocation: Invocation, now: float) -> None:
        record: dict[str, Any] = {
            "requestId": invocation.invoke.request_id,
            "status": invocation.status,
            "metrics": {"durationMs": ms(now - invocation.started_at), "producedBytes": invocation.produced_bytes},
            "tracing": {"type": "X-Amzn-Trace-Id", "value": invocation.invoke.trace_id},
        }
        if invocation.error_type:
            record["errorType"] = invocation.error_type
        if invocation.response_at is not None:
            first = invocation.first_byte_at or invocation.response_at
            record["spans"] = [
                span("responseLatency", invocation.started_at, first),
                span("responseDuration", first, invocation.response_at),
            ]
        self._emit(now, "platform.runtimeDone", **record)

    def _maybe_finish_invoke(self, now: float) -> None:
        invocation = self._invocation
        assert invocation is not None
        busy = any(ext.state is not ExtensionState.WAITING for ext in self.registry.subscribed("INVOKE"))
        if not self._runtime_waiting or busy:
            return
        self._cmds.append(CancelTimer(Timer.INVOKE))
        runtime_done = invocation.runtime_done_at or now
        self._finish_invoke(invocation, now, invocation.status, invocation.error_type, ms(now - runtime_done))
        self.phase = Phase.READY
        self._go_idle_or_invoke(now)

    def _finish_invoke(
        self, invocation: Invocation, now: float, status: str, error_type: str | None, post: float | None = None
    ) -> None:
        self._invocation = None
        self._mark_invoke_end(now, invocation.invoke.request_id, status, error_type)
        self._cmds.append(
            FinishInvoke(
                invocation.invoke.request_id,
                status,
                error_type,
                ms(now - invocation.started_at),
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

    # ---- shutdown ---------------------------------------------------------------------------------------------

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
