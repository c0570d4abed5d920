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

Transitions are a table keyed by (phase, fact type); anything not in the table is denied with an ApiError. The steps
the transitions take (begin, finish or fail Init, an invoke, shutdown's stages) are in :mod:`steps`; the settings
and state in :mod:`state`.

Marks. With ``Settings.marks`` on, the core also emits ``lambdabox.*`` events (listed in :mod:`facts`) at the moments a
timeline needs: a process started, asked for its next event, was handed one, answered, was signalled, exited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.errors import ApiError
from lambdabox.core.extensions import ExtensionState
from lambdabox.core.facts import (
    Command,
    DeadlinePassed,
    ErrorPosted,
    ExtensionErrorPosted,
    ExtensionRegistered,
    ExtensionRequestedNext,
    Fact,
    FinishInvoke,
    FinishShutdown,
    InitErrorPosted,
    InitRequested,
    InvokeRequested,
    Kill,
    ProcessExited,
    Respond,
    ResponsePosted,
    RuntimeRequestedNext,
    ShutdownRequested,
    Thaw,
    Timer,
)
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.core.record import exit_description
from lambdabox.core.state import INIT_TIMEOUT_S, Invocation, Phase
from lambdabox.core.steps import Steps


class Lifecycle(Steps):
    """One execution environment's lifecycle. ``handle`` is the only entry point."""

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

    def _on_init_error(self, fact: InitErrorPosted, now: float) -> None:
        outcome = FunctionFailure(fact.body, fact.error_type)
        self._fail_init(now, fact.error_type, outcome)

    def _on_extension_error_init(self, fact: ExtensionErrorPosted, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.EXITED
        message = fact.message or f"extension {extension.name} reported {fact.error_type}"
        self._fail_init(now, fact.error_type, LambdaFailure(fact.error_type, message))

    def _on_init_deadline(self, fact: DeadlinePassed, now: float) -> None:
        if fact.timer is not Timer.INIT:
            return
        message = f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds"
        self._fail_init(now, "Sandbox.Timedout", LambdaFailure("Sandbox.Timedout", message))

    # ---- invoke -----------------------------------------------------------------------------------------------

    def _on_invoke_ready(self, fact: InvokeRequested, now: float) -> None:
        if self._frozen:
            self._frozen = False
            self._cmds.append(Thaw())
        self._start_invoke(fact.invoke, now)

    def _check_request_id(self, request_id: str) -> Invocation:
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

    def _on_extension_next_invoke(self, fact: ExtensionRequestedNext, now: float) -> None:
        extension = self.registry.get(fact.identifier)
        extension.state = ExtensionState.WAITING
        request_id = self._invocation.invoke.request_id if self._invocation else None
        self._mark(now, mark.NEXT, extension.name, phase="invoke", requestId=request_id)
        self._deliver_pending(extension.identifier, now)
        self._maybe_finish_invoke(now)

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

    def _ignore(self, fact: Fact, now: float) -> None:
        """Late timers, and processes reaped after the phase that started them ended."""


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
