"""The lifecycle of one Lambda execution environment as a pure, synchronous state machine.

Theory of operation. The shell feeds facts in (``handle(fact, now)``) and carries the returned commands out, in
order. ``now`` is epoch seconds supplied by the shell; nothing here reads a clock or touches a socket.

    UNINITIALIZED --InitRequested/InvokeRequested--> EXTENSION_INIT --(every external extension registered)-->
    RUNTIME_INIT --(the runtime and every extension called /next)--> READY --(freeze)--> FROZEN
    READY/FROZEN --InvokeRequested--> INVOKE --(the runtime and every INVOKE extension called /next)--> READY/FROZEN
    INIT/READY/INVOKE --(timeout, crash, init error)--> RESET_RUNTIME --> RESET_EXTENSIONS --> UNINITIALIZED
    any --ShutdownRequested--> SHUTDOWN_RUNTIME --> SHUTDOWN_EXTENSIONS --> GONE

Init: external extensions start first; the runtime starts once every one of them has registered (the Extension init
sub-phase); Logs and Telemetry API subscriptions are accepted during Init only. Invoke: the runtime gets the event and
every extension registered for INVOKE gets an INVOKE event; the caller gets the response as soon as the runtime posts
it; the function timeout bounds the whole phase. Shutdown (a reset's or the final one): SIGTERM to the runtime (its
share of the budget, the *_RUNTIME states), then SHUTDOWN to the extensions registered for it (*_EXTENSIONS), then
SIGKILL for whatever is left at the deadline (0 / 500 / 2000 ms, CONTRACT.md section 3). A reset keeps an invoke that
arrives during it and begins a new Init for it; a ShutdownRequested turns a reset into the final shutdown.

Transitions are a table keyed by (state, fact type), denied by default (ApiError). Each Init, invoke and shutdown is
an object of its own (:mod:`initialization`, :mod:`invocation`, :mod:`shutdown`) that emits its step's commands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lambdabox.core import facts as f
from lambdabox.core import record
from lambdabox.core.errors import ApiError, ErrorType
from lambdabox.core.extensions import ExtensionRegistry, ExtensionState
from lambdabox.core.initialization import Initialization
from lambdabox.core.invocation import Invocation
from lambdabox.core.model import FunctionFailure, LambdaFailure
from lambdabox.core.output import Output
from lambdabox.core.processes import Processes
from lambdabox.core.shutdown import Shutdown
from lambdabox.core.state import (
    FLUSH_BEFORE_SHUTDOWN_S,
    IDLE_STATES,
    INIT_STATES,
    INIT_TIMEOUT_S,
    PAUSE_BEFORE_FREEZE_S,
    RESET_STATES,
    RUNTIME_STAGES,
    SHUTDOWN_STATES,
    Phase,
    Settings,
    State,
)
from lambdabox.core.subscriptions import Subscriptions
from lambdabox.core.telemetry import subscription_record

S = State


class Lifecycle:
    """One execution environment's lifecycle. ``handle`` is the only entry point; the rest is read-only state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = State.UNINITIALIZED
        self.registry = ExtensionRegistry(settings.extensions)
        self.inits = 0  # successful Inits so far
        self.failure: str | None = None  # why the last Init failed, or why the environment was last reset
        self.subscriptions = Subscriptions()
        self._out = Output(settings.marks)
        self._processes = Processes()
        self._init = Initialization("on-demand", 0.0, 0, self._out)
        self._init_duration_ms: float | None = None  # of an Init the next invoke reports
        self._pending: f.Invoke | None = None  # an invoke waiting for an Init (or a reset) to end
        self._invocation: Invocation | None = None
        self._shutdown = Shutdown("", self._out)

    def handle(self, fact: f.Fact, now: float) -> list[f.Command]:
        handler = _TABLE.get((self.state, type(fact)))
        if handler is None:
            message = f"{type(fact).__name__} is not allowed in phase {self.phase.value}"
            raise ApiError(403, ErrorType.INVALID_STATE_TRANSITION, message)
        self._out.begin(now)
        handler(self, fact, now)
        return self._out.take()

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def initialized(self) -> bool:
        """Whether the environment holds a successful Init now (ready, frozen or invoking)."""
        return self.state in IDLE_STATES or self.state is State.INVOKE

    @property
    def current_request_id(self) -> str | None:
        return self._invocation.request_id if self._invocation else None

    # ---- init -------------------------------------------------------------------------------------------------

    def _on_init(self, fact: f.InitRequested, now: float) -> None:
        self._begin_init(now, fact.initialization_type)

    def _on_invoke_uninitialized(self, fact: f.InvokeRequested, now: float) -> None:
        self._pending = fact.invoke
        self._begin_init(now, self._init.initialization_type)

    def _on_invoke_waiting(self, fact: f.InvokeRequested, now: float) -> None:
        """During Init, or a reset: the invoke waits for the (next) Init."""
        if self._pending is not None:
            raise ApiError(429, ErrorType.TOO_MANY_REQUESTS, "the environment already has an invoke waiting")
        self._pending = fact.invoke

    def _on_register(self, fact: f.ExtensionRegistered, now: float) -> None:
        runtime_started = self.state is State.RUNTIME_INIT
        extension = self.registry.register(fact.name, fact.events, fact.identifier, runtime_started=runtime_started)
        self._out.emit("platform.extension", name=extension.name, state="Ready", events=sorted(extension.events))
        self._maybe_start_runtime(now)

    def _on_subscribe(self, fact: f.SubscriptionRequested, now: float) -> None:
        name = self.registry.get(fact.identifier).name
        subscription = self.subscriptions.accept(fact.api, name, fact.body, during_init=self.state in INIT_STATES)
        if subscription is not None:
            self._out.add(f.Subscribe(name, subscription))
            self._out.emit_record(*subscription_record(fact.api, name, subscription.types))

    def _on_runtime_next_init(self, fact: f.RuntimeRequestedNext, now: float) -> None:
        self._init.runtime_ready = True
        self._out.mark(f.NEXT, None, phase="init")
        self._maybe_finish_init(now)

    def _on_extension_next_init(self, fact: f.ExtensionRequestedNext, now: float) -> None:
        self.registry.waiting(fact.identifier, self._out, phase="init")
        self._maybe_finish_init(now)

    def _on_init_error(self, fact: f.InitErrorPosted, now: float) -> None:
        self._fail_init(now, FunctionFailure(fact.body, fact.error_type))

    def _on_extension_error_init(self, fact: f.ExtensionErrorPosted, now: float) -> None:
        extension = self.registry.exited(fact.identifier)
        message = fact.message or f"extension {extension.name} reported {fact.error_type}"
        self._fail_init(now, LambdaFailure(fact.error_type, message))

    def _on_init_deadline(self, fact: f.DeadlinePassed, now: float) -> None:
        if fact.timer is f.Timer.INIT:
            self._fail_init(
                now, LambdaFailure(ErrorType.SANDBOX_TIMEDOUT, f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds")
            )

    def _begin_init(self, now: float, initialization_type: str) -> None:
        self.state = State.EXTENSION_INIT
        self._init = Initialization(initialization_type, now, self._init.generation + 1, self._out)
        self.registry = ExtensionRegistry(self.settings.extensions)
        self.subscriptions.clear()
        self._init.begin(self.settings)
        self._processes.alive.update(self.settings.extensions)
        self._maybe_start_runtime(now)

    def _maybe_start_runtime(self, now: float) -> None:
        if self.state is State.EXTENSION_INIT and self.registry.all_external_registered():
            self.state = State.RUNTIME_INIT
            self._processes.alive.add(None)
            self._init.start_runtime()

    def _maybe_finish_init(self, now: float) -> None:
        if not (self._init.runtime_ready and self.registry.all_waiting() and self.state is State.RUNTIME_INIT):
            return
        duration = self._init.end(now, "success")
        # REPORT shows Init Duration when the init was part of an invoke's cold start: on demand, or an init an invoke
        # waited for (in a provisioned environment too, after a reset); not an init ahead of demand.
        on_demand = self._init.initialization_type == "on-demand" or self._pending is not None
        self._init_duration_ms = duration if on_demand else None
        self.inits += 1
        self._go_idle_or_invoke(now)

    def _fail_init(self, now: float, failure: FunctionFailure | LambdaFailure) -> None:
        self.failure = f"Init failed: {failure.error_type}"
        duration = self._init.end(now, "error", failure.error_type)
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            Invocation(invoke, now, duration, self._out).refuse(failure, "error", self.settings.version)
        self._begin_shutdown(now, "failure", reset=True)

    # ---- invoke -----------------------------------------------------------------------------------------------

    def _on_invoke_ready(self, fact: f.InvokeRequested, now: float) -> None:
        if self.state is State.FROZEN:
            self._out.add(f.Thaw())
        self._start_invoke(fact.invoke, now)

    def _go_idle_or_invoke(self, now: float) -> None:
        self.state = State.READY
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            self._start_invoke(invoke, now)
        elif self.settings.freeze:
            if self.subscriptions:  # a delivery under way must not be left waiting on a frozen listener
                self._out.add(f.PauseTelemetry(now + PAUSE_BEFORE_FREEZE_S))
            self.state = State.FROZEN
            self._out.add(f.Freeze())

    def _start_invoke(self, invoke: f.Invoke, now: float) -> None:
        self.state = State.INVOKE
        init_ms, self._init_duration_ms = self._init_duration_ms, None
        self._invocation = Invocation(invoke, now, init_ms, self._out)
        event = self._invocation.start(now + self.settings.timeout_s, self.settings.version)
        for extension in self.registry.subscribed("INVOKE"):
            self.registry.send(extension.identifier, event, self._out)

    def _on_response(self, fact: f.ResponsePosted, now: float) -> None:
        self._invoking().respond(fact, now)

    def _on_error(self, fact: f.ErrorPosted, now: float) -> None:
        self._invoking().error(fact, now)

    def _on_runtime_next_invoke(self, fact: f.RuntimeRequestedNext, now: float) -> None:
        self._invoking().runtime_next(now)
        self._maybe_finish_invoke(now)

    def _on_extension_next_invoke(self, fact: f.ExtensionRequestedNext, now: float) -> None:
        self.registry.waiting(fact.identifier, self._out, phase="invoke", requestId=self.current_request_id)
        self._maybe_finish_invoke(now)

    def _on_invoke_deadline(self, fact: f.DeadlinePassed, now: float) -> None:
        if fact.timer is f.Timer.INVOKE:
            message = f"Task timed out after {self.settings.timeout_s:.2f} seconds"
            self._fail_invoke(now, "timeout", LambdaFailure(ErrorType.SANDBOX_TIMEDOUT, message))

    def _on_extension_error_invoke(self, fact: f.ExtensionErrorPosted, now: float) -> None:
        extension = self.registry.exited(fact.identifier)
        self._fail_invoke(now, "failure", LambdaFailure(fact.error_type, f"extension {extension.name} failed"))

    def _maybe_finish_invoke(self, now: float) -> None:
        invocation = self._invoking()
        if invocation.runtime_done_at is None or not self.registry.all_waiting("INVOKE"):
            return
        self._out.add(f.CancelTimer(f.Timer.INVOKE))
        self._invocation = None
        if invocation.status != "success":
            self.failure = invocation.error_type
        invocation.finish(now, record.ms(now - invocation.runtime_done_at))
        self._go_idle_or_invoke(now)

    def _fail_invoke(
        self, now: float, status: str, failure: LambdaFailure, *, reason: str | None = None, reset: bool = True
    ) -> None:
        invocation, self._invocation = self._invoking(), None
        invocation.fail(now, status, failure)
        self.failure = invocation.error_type
        self._begin_shutdown(now, reason or ("timeout" if status == "timeout" else "failure"), reset=reset)

    def _invoking(self) -> Invocation:
        """The invoke in progress (the table calls the invoke handlers only during one)."""
        assert self._invocation is not None
        return self._invocation

    # ---- processes that end -----------------------------------------------------------------------------------

    def _on_exit(self, fact: f.ProcessExited, now: float) -> None:
        if (ended := self._processes.exited(fact, self._init.generation)) is None:
            return  # a process of an Init given up on
        if ended.unexpected:
            self._out.mark(f.PROCESS_EXIT, fact.extension, returncode=fact.returncode, description=ended.description)
            self.failure = f"{fact.extension or 'the runtime'} exited: {ended.description}"
        if fact.extension is not None and (extension := self.registry.by_name(fact.extension)) is not None:
            extension.state = ExtensionState.EXITED
        if self.phase is Phase.SHUTDOWN:
            self._advance_shutdown(now)
            return
        failure = record.crash_failure(fact.extension, ended.description, out_of_memory=ended.out_of_memory)
        if self.phase is Phase.INIT:
            self._fail_init(now, failure)
        elif self.state is State.INVOKE:
            self._fail_invoke(now, "failure", failure)
        else:  # ready: a process died between invokes; start over at the next invoke
            self._begin_shutdown(now, "failure", reset=True)

    # ---- shutdown ---------------------------------------------------------------------------------------------

    def _on_shutdown(self, fact: f.ShutdownRequested, now: float) -> None:
        if self.state is State.UNINITIALIZED:
            self.state = State.GONE
            self._out.add(f.FinishShutdown(fact.reason, reset=False))
            return
        self._refuse_pending(now)
        if self._invocation is not None:
            failure = LambdaFailure(ErrorType.SANDBOX_SHUTDOWN, "the environment was shut down during the invoke")
            self._fail_invoke(now, "failure", failure, reason=fact.reason, reset=False)
            return
        self._begin_shutdown(now, fact.reason, reset=False)

    def _on_shutdown_during_reset(self, fact: f.ShutdownRequested, now: float) -> None:
        """A reset already under way becomes the final shutdown; an invoke waiting for it is answered."""
        self.state = State.SHUTDOWN_RUNTIME if self.state is State.RESET_RUNTIME else State.SHUTDOWN_EXTENSIONS
        self._refuse_pending(now)

    def _refuse_pending(self, now: float) -> None:
        """An invoke waiting for an Init when the environment shuts down is answered, and over."""
        if self._pending is not None:
            invoke, self._pending = self._pending, None
            failure = LambdaFailure(
                ErrorType.SANDBOX_SHUTDOWN, "the environment was shut down before the invoke started"
            )
            Invocation(invoke, now, None, self._out).refuse(failure, "failure", self.settings.version)

    def _on_shutdown_deadline(self, fact: f.DeadlinePassed, now: float) -> None:
        if fact.timer is f.Timer.RUNTIME_SHUTDOWN and self.state in RUNTIME_STAGES:
            self._shutdown.kill_runtime()
            self._processes.alive.discard(None)
            self._advance_shutdown(now)
        elif fact.timer is f.Timer.SHUTDOWN:
            self._finish_shutdown(now)

    def _on_extension_next_shutdown(self, fact: f.ExtensionRequestedNext, now: float) -> None:
        self.registry.waiting(fact.identifier, self._out, flush_until=self._flush_until(now), phase="shutdown")

    def _begin_shutdown(self, now: float, reason: str, *, reset: bool) -> None:
        if self.state is State.FROZEN:
            self._out.add(f.Thaw())
        if reset:
            self.failure = self.failure or f"reset ({reason})"
        self._pending = None
        self._shutdown = Shutdown(reason, self._out)
        runtime_alive = None in self._processes
        waits = self._shutdown.begin(now, self.registry.shutdown_budget(), reset=reset, runtime_alive=runtime_alive)
        if waits and runtime_alive:
            self.state = State.RESET_RUNTIME if reset else State.SHUTDOWN_RUNTIME
            return
        self.state = State.RESET_EXTENSIONS if reset else State.SHUTDOWN_EXTENSIONS
        if waits:
            self._shutdown.send_events(self.registry, self._processes.alive, self._flush_until(now))
            self._advance_shutdown(now)
        else:
            self._finish_shutdown(now)

    def _advance_shutdown(self, now: float) -> None:
        if self.state in RUNTIME_STAGES:
            if None in self._processes:
                return
            self.state = State.RESET_EXTENSIONS if self.state is State.RESET_RUNTIME else State.SHUTDOWN_EXTENSIONS
            self._shutdown.end_runtime_stage()
            self._shutdown.send_events(self.registry, self._processes.alive, self._flush_until(now))
        if not any(ext.name in self._processes for ext in self.registry.subscribed("SHUTDOWN")):
            self._finish_shutdown(now)

    def _finish_shutdown(self, now: float) -> None:
        reset = self.state in RESET_STATES
        self._shutdown.finish(self._processes.alive, reset=reset)
        self._processes.alive.clear()
        self.registry = ExtensionRegistry(self.settings.extensions)
        self.state = State.UNINITIALIZED if reset else State.GONE
        if reset and self._pending is not None:
            self._begin_init(now, self._init.initialization_type)

    def _flush_until(self, now: float) -> float | None:
        """Before a SHUTDOWN is handed out, subscribers get the records so far, within this bound."""
        return now + FLUSH_BEFORE_SHUTDOWN_S if self.subscriptions else None

    def _ignore(self, fact: f.Fact, now: float) -> None:
        """Late timers, and processes reaped after the phase that started them ended."""


_Handler = Callable[[Lifecycle, Any, float], None]
L = Lifecycle


def _rows(states: Iterable[State], handlers: dict[type, _Handler]) -> dict[tuple[State, type], _Handler]:
    return {(state, fact): handler for state in states for fact, handler in handlers.items()}


_TABLE: dict[tuple[State, type], _Handler] = {
    **_rows([S.UNINITIALIZED], {
        f.InitRequested: L._on_init, f.InvokeRequested: L._on_invoke_uninitialized, f.ShutdownRequested: L._on_shutdown,
        f.DeadlinePassed: L._ignore, f.ProcessExited: L._ignore,
    }),
    **_rows(INIT_STATES, {
        f.InvokeRequested: L._on_invoke_waiting, f.ExtensionRegistered: L._on_register,
        f.ExtensionRequestedNext: L._on_extension_next_init, f.ExtensionErrorPosted: L._on_extension_error_init,
        f.ProcessExited: L._on_exit, f.DeadlinePassed: L._on_init_deadline, f.ShutdownRequested: L._on_shutdown,
    }),
    **_rows([S.RUNTIME_INIT], {f.RuntimeRequestedNext: L._on_runtime_next_init, f.InitErrorPosted: L._on_init_error}),
    # In any state a subscription is checked (identifier, body); outside Init it is then refused with a 403.
    **_rows(State, {f.SubscriptionRequested: L._on_subscribe}),
    **_rows(IDLE_STATES, {
        f.InvokeRequested: L._on_invoke_ready, f.ProcessExited: L._on_exit, f.DeadlinePassed: L._ignore,
        f.ShutdownRequested: L._on_shutdown,
    }),
    **_rows([S.INVOKE], {
        f.ResponsePosted: L._on_response, f.ErrorPosted: L._on_error, f.RuntimeRequestedNext: L._on_runtime_next_invoke,
        f.ExtensionRequestedNext: L._on_extension_next_invoke, f.ExtensionErrorPosted: L._on_extension_error_invoke,
        f.ProcessExited: L._on_exit, f.DeadlinePassed: L._on_invoke_deadline, f.ShutdownRequested: L._on_shutdown,
    }),
    **_rows(RESET_STATES | SHUTDOWN_STATES, {
        f.ExtensionRequestedNext: L._on_extension_next_shutdown, f.RuntimeRequestedNext: L._ignore,
        f.ExtensionErrorPosted: L._ignore, f.ProcessExited: L._on_exit, f.DeadlinePassed: L._on_shutdown_deadline,
        f.ShutdownRequested: L._ignore,
    }),
    **_rows(RESET_STATES, {f.InvokeRequested: L._on_invoke_waiting, f.ShutdownRequested: L._on_shutdown_during_reset}),
    **_rows([S.GONE], {f.ProcessExited: L._ignore, f.DeadlinePassed: L._ignore, f.ShutdownRequested: L._ignore}),
}  # fmt: skip
