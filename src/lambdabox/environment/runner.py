"""One execution environment: the asyncio shell around the lifecycle core.

It feeds facts to the core (``submit``) and carries out the commands that come back, in order: at once, or in its
worker for the ones that take time (``lambdabox.core.facts.AWAITED``) and every one behind them. Every task it starts
(the worker, a watcher per process) is in its task group; every process, timer and waiter is its own. A command that
fails is reported in the environment's log and the next one goes on; an observer that fails cannot stop either.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lambdabox.core import facts as f
from lambdabox.core.errors import ApiError
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionConfig, Outcome
from lambdabox.core.record import billed_ms
from lambdabox.core.state import SLACK_S, invoke_budget_s
from lambdabox.environment.delivery import TelemetryHub
from lambdabox.environment.observers import Observers
from lambdabox.environment.processes import Processes
from lambdabox.environment.report import InvokeResult, Report, TelemetryEvent, report_record
from lambdabox.sandbox.isolation import Isolation
from lambdabox.sandbox.runtime import RuntimeCommand, runtime_dir_for
from lambdabox.sandbox.variables import extension_environment, function_environment, host_credentials

if TYPE_CHECKING:
    from lambdabox.environment.options import Options
    from lambdabox.sandbox.held import Holder

MIB = 1024 * 1024


def new_trace_id(now: float) -> str:
    return f"Root=1-{int(now):08x}-{uuid.uuid4().hex[:24]};Parent={uuid.uuid4().hex[:16]};Sampled=0"


class Environment:
    """A live environment, built by :func:`lambdabox.environment.opening.open_environment` from its parts; call
    :meth:`invoke` as often as needed."""

    def __init__(
        self,
        config: FunctionConfig,
        options: Options,
        *,
        lifecycle: Lifecycle,
        isolation: Isolation,
        runtime: RuntimeCommand,
        hub: TelemetryHub,
        observers: Observers,
        now: Callable[[], float],
        tasks: asyncio.TaskGroup,
        runtime_api: str,
        host_api: str,
        netns: Holder | None,
        log_stream: str,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.options = options
        self.lifecycle = lifecycle
        self.isolation = isolation
        self.hub = hub
        self.observers = observers
        self.now = now
        self.runtime_api = runtime_api  # host:port of the APIs as the runtime and extensions see them
        self.host_api = host_api  # host:port where lambdabox and tests reach the same APIs from the host
        self.netns = netns  # the environment's network namespace, to make sockets inside it; None: the host's
        self.log_stream = log_stream
        self._runtime = runtime
        self._on_reset = on_reset
        self._tasks = tasks
        self._queue: deque[f.Command] = deque()  # handed out by the core, not yet carried out, in order
        self._busy = False  # carrying commands out now (here, or in the worker): new ones join the queue
        self._wake = asyncio.Event()  # the worker has commands to carry out
        self._settled = asyncio.Event()  # every command handed out so far is carried out
        self._settled.set()
        self._pausing: asyncio.Timeout | None = None  # the wait for deliveries under way before a freeze
        # A thaw the core asked for, carried out just after the event it goes with is written (see _schedule_thaw).
        self._thaw_owed = False
        self._thaw_soon: asyncio.Handle | None = None
        self._processes = Processes(isolation, observers, tasks, now, self._submit_quietly)
        self._timers: dict[f.Timer, asyncio.TimerHandle] = {}
        self._runtime_waiter: asyncio.Future[tuple[f.Invoke, float]] | None = None
        self._extension_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        self._reports: dict[str, asyncio.Future[Report]] = {}
        self._inits: list[asyncio.Future[bool]] = []
        self._gone = asyncio.Event()
        self._lock = asyncio.Lock()
        self._worker = tasks.create_task(self._work(), name=f"lambdabox-{config.logical_id}-commands")

    # ---- typed state, for whoever holds the environment -------------------------------------------------------

    @property
    def degraded(self) -> tuple[str, ...]:
        """What differs from Lambda in this environment, one sentence each (the isolation's)."""
        return self.isolation.degraded

    @property
    def cleaned(self) -> tuple[str, ...]:
        """What lambdabox processes that died left on the host and opening this environment removed."""
        return self.isolation.cleaned

    @property
    def initialized(self) -> bool:
        """It holds a successful Init now (ready, frozen, or invoking)."""
        return self.lifecycle.initialized

    @property
    def inits(self) -> int:
        """Successful Inits so far."""
        return self.lifecycle.inits

    @property
    def failure(self) -> str | None:
        """Why the last Init failed, or why the environment was last reset."""
        return self.lifecycle.failure

    # ---- the HTTP adapters' side (api.ports.EnvironmentPort) ----------------------------------------------------

    def submit(self, fact: f.Fact) -> None:
        """Hand a fact to the core; ApiError when the core refuses it."""
        if self._pausing is not None and isinstance(fact, f.InvokeRequested | f.ShutdownRequested):
            # The environment will not stay frozen: the freeze (and the invoke or shutdown behind it) waits on no
            # delivery; one under way goes on after the thaw, as on Lambda, where it never adds to a Duration.
            self._pausing.reschedule(asyncio.get_running_loop().time())
        self._queue.extend(self.lifecycle.handle(fact, self.now()))
        if not self._busy:
            self._carry_out()

    async def runtime_next(self, fact: f.RuntimeRequestedNext) -> tuple[f.Invoke, float]:
        waiter: asyncio.Future[tuple[f.Invoke, float]] = asyncio.get_running_loop().create_future()
        self._runtime_waiter = waiter
        self.submit(fact)
        return await waiter

    async def extension_next(self, fact: f.ExtensionRequestedNext) -> dict[str, Any]:
        identifier = self.lifecycle.registry.get(fact.identifier).identifier
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._extension_waiters[identifier] = waiter
        self.submit(fact)
        return await waiter

    # ---- what callers use -------------------------------------------------------------------------------------

    async def initialize(self) -> bool:
        """Run Init ahead of the first invoke (as provisioned concurrency does): True once it succeeded, False once it
        failed. Bound it with ``INIT_BUDGET_S``."""
        ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inits.append(ended)
        try:
            self.submit(f.InitRequested(self.options.initialization_type))
            return await ended
        finally:
            if ended in self._inits:
                self._inits.remove(ended)

    async def invoke(
        self,
        payload: bytes,
        *,
        client_context: str | None = None,
        cognito_identity: str | None = None,
        invoked_function_arn: str | None = None,
        request_id: str | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> InvokeResult:
        """Invoke once; returns when the invoke phase is over (the runtime and every extension are done).

        ``on_outcome`` is called as soon as the outcome is known, which is when Lambda answers the caller:
        extensions may still be working then.
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            request_id = request_id or str(uuid.uuid4())
            outcome = self._outcomes[request_id] = loop.create_future()
            report = self._reports[request_id] = loop.create_future()
            arn = invoked_function_arn or self.config.arn
            invoke = f.Invoke(request_id, payload, arn, new_trace_id(self.now()), client_context, cognito_identity)
            try:
                self.submit(f.InvokeRequested(invoke))
                async with asyncio.timeout(invoke_budget_s(self.config.timeout_s)):
                    answer = await outcome
                    if on_outcome is not None:
                        on_outcome(answer)
                    return InvokeResult(request_id, answer, await report)
            finally:
                self._outcomes.pop(request_id, None)
                self._reports.pop(request_id, None)

    async def shutdown(self, reason: str = "spindown") -> None:
        """Shut down as Lambda does (SIGTERM, SHUTDOWN, SIGKILL at the budget) and wait until all is reaped."""
        with contextlib.suppress(ApiError):
            self.submit(f.ShutdownRequested(reason))
        async with asyncio.timeout(2.0 + SLACK_S):
            await self._gone.wait()

    async def settled(self) -> None:
        """Wait until every command the core has handed out so far has been carried out."""
        await self._settled.wait()

    async def close(self) -> None:
        """The environment's end (after :meth:`shutdown`): its worker, watchers and timers stop."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._cancel_thaw()
        for task in (self._worker, *self._processes.watchers):
            task.cancel()
        await asyncio.gather(self._worker, *self._processes.watchers, return_exceptions=True)
        self.observers.report_counts()

    # ---- carrying out commands --------------------------------------------------------------------------------

    def _carry_out(self) -> None:
        """Carry out the queued commands in order, at once, up to the first that must be awaited: that one and all
        behind it go to the worker. (Most of an invoke's commands are immediate: they cost no task switch.)"""
        self._busy = True
        while self._queue:
            if type(self._queue[0]) in f.AWAITED:
                self._settled.clear()
                self._wake.set()  # the worker carries on; it clears _busy when the queue is empty
                return
            self._run(self._queue.popleft())
        self._busy = False
        self._schedule_thaw()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                command = self._queue.popleft()
                if type(command) in f.AWAITED:
                    self._thaw_now_if_owed()  # what it awaits may need the processes running
                    try:
                        await self._run_awaited(command)
                    except Exception as error:
                        self._failed(command, error)
                else:
                    self._run(command)
            self._busy = False
            self._schedule_thaw()
            self._settled.set()

    def _failed(self, command: f.Command, error: Exception) -> None:
        """A command that could not be carried out: said in the environment's log; the next ones go on."""
        self.observers.log(f"lambdabox: {type(command).__name__} failed: {error!r}")

    def _run(self, command: f.Command) -> None:
        """Carry out a command that needs no waiting."""
        try:
            self._run_now(command)
        except Exception as error:
            self._failed(command, error)

    def _run_now(self, command: f.Command) -> None:
        match command:
            case f.DeliverInvoke(invoke=invoke, deadline=deadline):
                _resolve(self._runtime_waiter, (invoke, deadline))
                self._schedule_thaw()
            case f.DeliverExtensionEvent(identifier=identifier, event=event):
                _resolve(self._extension_waiters.pop(identifier, None), event)
                self._schedule_thaw()
            case f.Respond(request_id=request_id, outcome=outcome):
                _resolve(self._outcomes.get(request_id), outcome)
            case f.FinishInvoke():
                self._finish_invoke(command)
            case f.ArmTimer(timer=timer, at=at):
                self._cancel_timer(timer)
                loop = asyncio.get_running_loop()
                self._timers[timer] = loop.call_later(max(0.0, at - self.now()), self._deadline, timer)
            case f.CancelTimer(timer=timer):
                self._cancel_timer(timer)
            case f.TerminateRuntime():
                self._processes.signal(None, signal.SIGTERM)
            case f.Kill(extension=name):
                self._processes.signal(name, signal.SIGKILL)
            case f.Freeze():
                self.hub.hold()
                if self._thaw_owed:  # still frozen: the thaw is simply not carried out
                    self._cancel_thaw()
                else:
                    self.isolation.freeze_at_once()
            case f.Thaw():
                self._thaw_owed = True
            case f.EmitPlatformEvent(type=type_, record=record, at=at):
                self.observers(TelemetryEvent(at, type_, record))
            case f.OpenSubscriptions():
                self.hub.open_init()
            case f.Subscribe(extension=name, subscription=subscription):
                self.hub.subscribe(name, subscription)
            case f.CloseSubscriptions():
                self.hub.close_init()
            case f.FinishInit(status=status):
                for ended in self._inits:
                    _resolve(ended, status == "success")
            case f.FinishShutdown(reset=reset):
                if not reset:
                    self._gone.set()
                elif self._on_reset is not None:
                    self._on_reset()

    async def _run_awaited(self, command: f.Command) -> None:
        match command:
            case f.StartExtension(name=name, generation=generation):
                argv = [f"{self.isolation.path('/opt/extensions')}/{name}"]
                await self._processes.start(name, generation, argv, self._extension_env())
            case f.StartRuntime(initialization_type=init_type, generation=generation):
                env, argv = self._function_env(init_type), list(self._runtime.argv)
                await self._processes.start(None, generation, argv, env, self._runtime.telemetry_fd)
            case f.KillAll():
                try:
                    await self._processes.kill_all()
                finally:  # nobody waits on an event from processes that are gone
                    for waiter in [self._runtime_waiter, *self._extension_waiters.values()]:
                        if waiter is not None and not waiter.done():
                            waiter.cancel()
                    self._extension_waiters.clear()
                    self._runtime_waiter = None
            case f.FlushTelemetry(until=until):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - self.now())):
                        await self.hub.flush()
            case f.PauseTelemetry(until=until):
                if any(type(later) is f.Thaw for later in self._queue):
                    return  # an invoke or a shutdown came first: a freeze for no time waits on nothing (see submit)
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, until - self.now())) as self._pausing:
                            await self.hub.pause()
                finally:  # (whatever ends the wait: submit must not reschedule a timeout that is over)
                    self._pausing = None
            case _:
                self._run(command)

    # ---- the thaw after the event ----------------------------------------------------------------------------------

    def _schedule_thaw(self) -> None:
        """Carry out an owed thaw at the loop's next turn: behind the writes of the events just delivered (each
        waiting handler's task was scheduled as its event was resolved). The frozen process then wakes once, with
        its event already there, instead of waking at the thaw to wait again for the event."""
        if self._thaw_owed and self._thaw_soon is None:
            self._thaw_soon = asyncio.get_running_loop().call_soon(self._thaw_now_if_owed)

    def _thaw_now_if_owed(self) -> None:
        if not self._thaw_owed:
            return
        self._cancel_thaw()
        try:
            self.isolation.thaw()
        except Exception as error:  # (a callback of the loop's: said, never raised)
            self._failed(f.Thaw(), error)
        self.hub.resume()

    def _cancel_thaw(self) -> None:
        self._thaw_owed = False
        if self._thaw_soon is not None:
            self._thaw_soon.cancel()
            self._thaw_soon = None

    def _finish_invoke(self, done: f.FinishInvoke) -> None:
        try:
            peak_mb = math.ceil(self.isolation.peak_memory_bytes() / MIB)
        except (OSError, ValueError) as error:
            self.observers.log(f"lambdabox: cannot read the peak memory: {error!r}")
            peak_mb = 0
        report = Report(
            done.request_id,
            done.status,
            done.error_type,
            done.duration_ms,
            billed_ms(done.duration_ms),
            self.config.memory_mb,
            peak_mb,
            done.init_duration_ms,
            done.post_runtime_extensions_ms,
        )
        self.observers(TelemetryEvent(self.now(), "platform.report", report_record(report)))
        _resolve(self._reports.get(done.request_id), report)

    def _deadline(self, timer: f.Timer) -> None:
        self._timers.pop(timer, None)
        self._submit_quietly(f.DeadlinePassed(timer))

    def _cancel_timer(self, timer: f.Timer) -> None:
        handle = self._timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _submit_quietly(self, fact: f.Fact) -> None:
        """A fact of the shell's own (an exit, a deadline): one the core no longer wants is dropped."""
        try:
            self.submit(fact)
        except ApiError:
            pass
        except Exception as error:  # a bug: said, and the environment goes on
            self.observers.log(f"lambdabox: {type(fact).__name__} could not be handled: {error!r}")

    # ---- environment variables --------------------------------------------------------------------------------

    def _function_env(self, initialization_type: str) -> dict[str, str]:
        lambda_paths = self.isolation.namespaced  # /var/lang and /var/runtime there, PATH exactly Lambda's
        return function_environment(
            self.config,
            runtime_api=self.runtime_api,
            task_root=self.isolation.path("/var/task"),
            runtime_dir="/var/runtime"
            if lambda_paths
            else str(runtime_dir_for(self.config.runtime, self.options.cache_dir)),
            initialization_type=initialization_type,
            log_stream=self.log_stream,
            credentials=host_credentials(),
            base_path="" if lambda_paths else None,
            opt_root=self.isolation.path("/opt"),
            runtime_env=self._runtime.env,
            path_prefix=("/var/lang/bin",) if lambda_paths and self._runtime.lang else self._runtime.path_prefix,
        )

    def _extension_env(self) -> dict[str, str]:
        return extension_environment(self._function_env(self.options.initialization_type))


def _resolve(waiter: asyncio.Future[Any] | None, value: Any) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)
