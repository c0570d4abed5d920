"""One execution environment, the asyncio shell around the lifecycle core.

It owns the environment's processes, timers, telemetry observers and environment variables; it feeds facts to
the core (``submit``) and carries out the commands that come back, one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from lambdabox.core import facts as f
from lambdabox.core.errors import ApiError
from lambdabox.core.lifecycle import Lifecycle
from lambdabox.core.model import FunctionConfig, Outcome
from lambdabox.core.record import billed_ms
from lambdabox.core.state import INIT_TIMEOUT_S
from lambdabox.core.telemetry import Subscription
from lambdabox.environment.delivery import TelemetryHub
from lambdabox.environment.report import InvokeResult, Observer, Report, TelemetryEvent, report_record
from lambdabox.sandbox.filesystem import StagedCode
from lambdabox.sandbox.isolation import Isolation
from lambdabox.sandbox.netns import NetNamespace
from lambdabox.sandbox.processes import OwnedProcess
from lambdabox.sandbox.runtime import RuntimeCommand, runtime_dir_for
from lambdabox.sandbox.variables import extension_environment, function_environment, log_stream_name

if TYPE_CHECKING:
    from lambdabox.environment.opening import Options

MIB = 1024 * 1024
SHUTDOWN_SLACK_S = 5.0  # beyond Lambda's own deadlines, for the machine to reap what it killed
FLUSH_BEFORE_SHUTDOWN_S = 0.5  # of the extensions' shutdown budget, to deliver the records produced so far
PAUSE_BEFORE_FREEZE_S = 6.0  # a delivery in flight is let finish before its listener is frozen


def new_trace_id(now: float) -> str:
    return f"Root=1-{int(now):08x}-{uuid.uuid4().hex[:24]};Parent={uuid.uuid4().hex[:16]};Sampled=0"


class Environment:
    """A live environment. Use :func:`open_environment`; call :meth:`invoke` as often as needed."""

    def __init__(self, config: FunctionConfig, options: Options, observers: Iterable[Observer]) -> None:
        self.config = config
        self.options = options
        self.hub = TelemetryHub(
            json_function_logs=config.environment.get("AWS_LAMBDA_LOG_FORMAT", "").upper() == "JSON",
            epoch=self.now,
            on_failing=self._subscriber_failing,
        )
        self.observers = [self.hub.observe, *observers]
        self._mono0, self._epoch0 = time.monotonic(), time.time()
        self._pending: deque[f.Command] = deque()  # handed out by the core, not yet carried out, in order
        self._draining = False  # carrying out commands at once, in submit()
        self._worker_wake = asyncio.Event()  # the worker carries out what must be awaited, and all behind it
        self._settled = asyncio.Event()  # nothing pending, the worker idle
        self._settled.set()
        self._procs: dict[str | None, OwnedProcess] = {}
        self._doomed: list[OwnedProcess] = []  # detached by Kill/KillAll, killed and reaped by KillAll
        self._timers: dict[f.Timer, asyncio.TimerHandle] = {}
        self._runtime_waiter: asyncio.Future[tuple[f.Invoke, float]] | None = None
        self._extension_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        self._reports: dict[str, asyncio.Future[Report]] = {}
        self._gone = asyncio.Event()
        self._lock = asyncio.Lock()
        self._oom_seen = False
        self.degraded: tuple[str, ...] = ()
        self.log_stream = log_stream_name(config.version, self._epoch0)
        self.lifecycle: Lifecycle
        self._isolation: Isolation
        self._staged: StagedCode
        self._runtime: RuntimeCommand
        self._api_address = ""
        self._host_api = ""
        self.netns: NetNamespace | None = None
        """The environment's network namespace, to make sockets inside it; None in the degraded mode."""

    # ---- the shell's side of the API adapters ------------------------------------------------------------------

    def now(self) -> float:
        return self._epoch0 + (time.monotonic() - self._mono0)

    def submit(self, fact: f.Fact) -> None:
        for command in self.lifecycle.handle(fact, self.now()):
            self._detach(command)
            self._pending.append(command)
        self._carry_out()

    def _detach(self, command: f.Command) -> None:
        """Processes the core has just given up on leave the table now, not when the command is carried out:
        their exits must not be reported as exits of the processes a following init starts under their names."""
        if isinstance(command, f.KillAll):
            self._doomed.extend(self._procs.values())
            self._procs.clear()
        elif isinstance(command, f.Kill) and (process := self._procs.pop(command.extension, None)) is not None:
            self._doomed.append(process)

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

    def extension_name(self, identifier: str | None) -> str:
        return self.lifecycle.registry.get(identifier).name

    def subscribe(self, extension_name: str, subscription: Subscription) -> None:
        emitted = self.hub.subscribe(extension_name, subscription)
        if emitted is not None:
            self._notify(TelemetryEvent(self.now(), *emitted))

    # ---- what callers use -------------------------------------------------------------------------------------

    @property
    def runtime_api(self) -> str:
        """``host:port`` of the APIs as the runtime and extensions see it (AWS_LAMBDA_RUNTIME_API)."""
        return self._api_address

    @property
    def host_api(self) -> str:
        """``host:port`` where lambdabox and tests reach the same APIs from the host's network namespace."""
        return self._host_api

    async def initialize(self) -> None:
        """Run Init ahead of the first invoke (as provisioned concurrency does)."""
        self.submit(f.InitRequested(self.options.initialization_type))

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
            invoke = f.Invoke(
                request_id,
                payload,
                invoked_function_arn or self.config.arn,
                new_trace_id(self.now()),
                client_context,
                cognito_identity,
            )
            self.submit(f.InvokeRequested(invoke))
            budget = INIT_TIMEOUT_S + self.config.timeout_s + SHUTDOWN_SLACK_S
            try:
                async with asyncio.timeout(budget):
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
        async with asyncio.timeout(2.0 + SHUTDOWN_SLACK_S):
            await self._gone.wait()

    # ---- carrying out commands --------------------------------------------------------------------------------

    def _carry_out(self) -> None:
        """Carry out the pending commands in order, at once, up to the first that must be awaited; that one and
        all behind it go to the worker. (Most of an invoke's commands are immediate: an invoke costs no task
        switches for them.) Re-entrant calls leave their commands to the loop already running."""
        if self._draining or not self._settled.is_set():
            return
        self._draining = True
        try:
            while self._pending:
                command = self._pending[0]
                if not self._immediate(command):
                    self._settled.clear()
                    self._worker_wake.set()
                    return
                self._pending.popleft()
                try:
                    self._execute_now(command)
                except Exception as error:
                    self._failed(command, error)
        finally:
            self._draining = False

    async def settled(self) -> None:
        """Wait until every command the core has handed out so far has been carried out."""
        await self._settled.wait()

    async def _run_commands(self) -> None:
        while True:
            await self._worker_wake.wait()
            self._worker_wake.clear()
            while self._pending:
                command = self._pending.popleft()
                try:
                    if self._immediate(command):
                        self._execute_now(command)
                    else:
                        await self._execute(command)
                except Exception as error:
                    self._failed(command, error)
            self._settled.set()

    def _failed(self, command: f.Command, error: Exception) -> None:
        """A command that could not be carried out: said in the environment's log; the next ones go on."""
        self._log("lambdabox", f"lambdabox: {type(command).__name__} failed: {error!r}")

    def _immediate(self, command: f.Command) -> bool:
        """Whether the command is carried out without waiting for anything."""
        match command:
            case f.StartExtension() | f.StartRuntime() | f.KillAll():
                return False
            case f.DeliverExtensionEvent(event=event):
                return bool(event["eventType"] != "SHUTDOWN")  # SHUTDOWN waits for the telemetry flush first
            case f.Freeze():
                return not self.hub.subscribed
        return True

    async def _execute(self, command: f.Command) -> None:
        """Carry out a command that must be awaited (see ``_immediate``)."""
        match command:
            case f.StartExtension(name=name):
                await self._start(name, [f"{self._isolation.path('/opt/extensions')}/{name}"], self._extension_env())
            case f.StartRuntime(initialization_type=init_type):
                env = self._function_env(init_type)
                await self._start(None, list(self._runtime.argv), env, telemetry_fd=self._runtime.telemetry_fd)
            case f.DeliverExtensionEvent(identifier=identifier, event=event):
                await self._flush_telemetry(FLUSH_BEFORE_SHUTDOWN_S)
                _resolve(self._extension_waiters.pop(identifier, None), event)
            case f.KillAll():
                await self._kill_all()
            case f.Freeze():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PAUSE_BEFORE_FREEZE_S):
                        await self.hub.pause()
                await self._isolation.freeze()

    def _execute_now(self, command: f.Command) -> None:
        """Carry out an immediate command (see ``_immediate``)."""
        match command:
            case f.DeliverInvoke(invoke=invoke, deadline=deadline):
                _resolve(self._runtime_waiter, (invoke, deadline))
            case f.DeliverExtensionEvent(identifier=identifier, event=event):
                _resolve(self._extension_waiters.pop(identifier, None), event)
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
                if (runtime := self._procs.get(None)) is not None:
                    runtime.signal(signal.SIGTERM)
            case f.Kill():
                for process in self._doomed:
                    process.signal(signal.SIGKILL)
            case f.Freeze():  # no subscriber: no delivery to wait for
                self.hub.hold()
                self._isolation.freeze_at_once()
            case f.Thaw():
                self._isolation.thaw()
                self.hub.resume()
            case f.EmitPlatformEvent(type=type_, record=record, at=at):
                self._notify(TelemetryEvent(at, type_, record))
            case f.FinishShutdown(reset=reset):
                if not reset:
                    self._gone.set()

    async def _start(
        self, name: str | None, argv: list[str], env: dict[str, str], *, telemetry_fd: bool = False
    ) -> None:
        label = "runtime" if name is None else name
        kind = "function" if name is None else "extension"
        try:
            process = await OwnedProcess.start(
                self._isolation.command(argv),
                env=env,
                cwd=self._isolation.host_cwd(),
                label=label,
                on_record=lambda source, text: self._notify(TelemetryEvent(self.now(), kind, text, source)),
                telemetry_fd=telemetry_fd,
            )
        except OSError as error:
            self._log(label, f"lambdabox: cannot start {label}: {error}")
            self._submit_quietly(f.ProcessExited(name, 127))
            return
        self._isolation.register(process.pid)
        self._procs[name] = process
        asyncio.get_running_loop().create_task(self._watch(name, process))

    async def _watch(self, name: str | None, process: OwnedProcess) -> None:
        returncode = await process.wait_exit()
        if self._procs.get(name) is not process:
            return  # killed on purpose by a command; the core already knows
        del self._procs[name]
        oom = self._isolation.oom_killed() and not self._oom_seen
        self._oom_seen = self._oom_seen or oom
        self._submit_quietly(f.ProcessExited(name, returncode, oom))

    async def _kill_all(self) -> None:
        processes, self._doomed = self._doomed, []
        for process in processes:
            process.signal(signal.SIGKILL)
        await self._isolation.kill_all()
        async with asyncio.timeout(SHUTDOWN_SLACK_S):
            await asyncio.gather(*(p.wait_exit() for p in processes))
        for waiter in [self._runtime_waiter, *self._extension_waiters.values()]:
            if waiter is not None and not waiter.done():
                waiter.cancel()
        self._extension_waiters.clear()
        self._runtime_waiter = None
        self._oom_seen = self._isolation.oom_killed()

    def _finish_invoke(self, done: f.FinishInvoke) -> None:
        peak_mb = math.ceil(self._isolation.peak_memory_bytes() / MIB)
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
        self._notify(TelemetryEvent(self.now(), "platform.report", report_record(report)))
        _resolve(self._reports.get(done.request_id), report)

    async def _flush_telemetry(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.hub.flush()

    def _subscriber_failing(self, name: str) -> None:
        self._log("lambdabox", f"lambdabox: deliveries to {name}'s telemetry listener keep failing; retrying")

    def _deadline(self, timer: f.Timer) -> None:
        self._timers.pop(timer, None)
        self._submit_quietly(f.DeadlinePassed(timer))

    def _cancel_timer(self, timer: f.Timer) -> None:
        handle = self._timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _submit_quietly(self, fact: f.Fact) -> None:
        with contextlib.suppress(ApiError):
            self.submit(fact)

    def _notify(self, event: TelemetryEvent) -> None:
        for observer in self.observers:
            observer(event)

    def _log(self, source: str, text: str) -> None:
        self._notify(TelemetryEvent(self.now(), "extension" if source != "runtime" else "function", text, source))

    # ---- environment variables --------------------------------------------------------------------------------

    def _function_env(self, initialization_type: str) -> dict[str, str]:
        return function_environment(
            self.config,
            runtime_api=self._api_address,
            task_root=self._isolation.path("/var/task"),
            runtime_dir=str(runtime_dir_for(self.config.runtime, self.options.cache_dir)),
            initialization_type=initialization_type,
            log_stream=self.log_stream,
            credentials=_credentials(),
            opt_root=self._isolation.path("/opt"),
            runtime_env=self._runtime.env,
            path_prefix=self._runtime.path_prefix,
        )

    def _extension_env(self) -> dict[str, str]:
        return extension_environment(self._function_env(self.options.initialization_type))


def _resolve(waiter: asyncio.Future[Any] | None, value: Any) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


def _credentials() -> dict[str, str]:
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    found = {name: os.environ[name] for name in names if name in os.environ}
    if "AWS_ACCESS_KEY_ID" not in found:
        found = {"AWS_ACCESS_KEY_ID": "AKIALAMBDABOXLOCAL00", "AWS_SECRET_ACCESS_KEY": "lambdabox-local-secret"}
    return found
