"""A function's live environment behind a synchronous facade: its event loop runs in a thread the facade owns, every
coroutine the facade starts there is a task of one task group, and every call into it, every wait and the shutdown
have a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lambdabox.core.model import FunctionConfig
from lambdabox.core.state import INIT_BUDGET_S, invoke_budget_s
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult, TelemetryEvent
from lambdabox.environment.runner import Environment
from lambdabox.loop import new_event_loop, open_task_group
from lambdabox.testing.events import (
    EXTENSION_STATES,
    LOG_TYPES,
    ExtensionEvent,
    Invocation,
    extension_step,
    last_lines,
    log_lines,
)

START_TIMEOUT_S = 120.0  # staging, isolation, and the first use of a runtime, which installs its client
SHUTDOWN_TIMEOUT_S = 30.0  # Lambda's shutdown budget is 2 s; the rest is for reaping
T = TypeVar("T")


class WaitTimedOut(AssertionError):
    """A wait or a call did not end within its deadline; the message says what was seen meanwhile."""


class PendingInvocation:
    """An invoke under way (:meth:`LambdaFunction.start_invoke`)."""

    def __init__(
        self, function: LambdaFunction, future: concurrent.futures.Future[tuple[InvokeResult, int]], first: int
    ) -> None:
        self._function, self._future, self._first = function, future, first
        self._deadline = invoke_budget_s(function.config.timeout_s) + 5.0
        self._result: Invocation | None = None

    def result(self, timeout: float | None = None) -> Invocation:
        """Wait until the invoke phase is over; by default as long as Lambda's own limits allow, and a little more."""
        if self._result is None:
            raw, last = self._function._bounded(self._future, timeout or self._deadline, "the invoke")
            events = tuple(self._function.events[self._first : last])
            self._result = Invocation(raw.request_id, raw.outcome, raw.report, events)
        return self._result


class LambdaFunction:
    """A function's live environment. Build it with function_from_code or function_from_template."""

    def __init__(
        self,
        config: FunctionConfig,
        options: Options | None = None,
        *,
        start_timeout: float = START_TIMEOUT_S,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._events: list[TelemetryEvent] = []
        self._cleanup = cleanup
        self._stopping = self._closed = False
        self._stop = asyncio.Event()  # the environment is to shut down
        self._end = asyncio.Event()  # the loop's task group is to end (what is left of its tasks is cancelled)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = new_event_loop()
        group_ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(group_ready,), name=f"lambdabox-{config.logical_id}", daemon=True
        )
        self._thread.start()
        group_ready.wait(start_timeout)
        ready: concurrent.futures.Future[Environment] = concurrent.futures.Future()
        self._owner = self._submit(self._own(options or Options(), ready))
        try:
            self._env = self._bounded(ready, start_timeout, "the environment's start")
        except BaseException:
            self._owner.cancel()
            self._finish(start_timeout)
            raise

    def __enter__(self) -> LambdaFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._stopping else "running"
        return f"<LambdaFunction {self.config.logical_id} ({self.config.runtime}), {state}>"

    # ---- invoking -------------------------------------------------------------------------------------------------

    def invoke(self, event: Any = None, *, payload: bytes | None = None, timeout: float | None = None) -> Invocation:
        """Invoke with ``event`` as JSON (default ``{}``) or a raw ``payload``; returns when the invoke phase is over
        (the runtime and every extension are done)."""
        return self.start_invoke(event, payload=payload).result(timeout)

    def start_invoke(
        self, event: Any = None, *, payload: bytes | None = None, client_context: str | None = None
    ) -> PendingInvocation:
        """Start an invoke and return at once, to look at what happens during it."""
        if self._stopping:
            raise RuntimeError(f"{self!r}: cannot be invoked")
        body = payload if payload is not None else json.dumps({} if event is None else event).encode()
        first = len(self.events)
        coroutine = self._invoke(body, client_context)
        return PendingInvocation(self, self._submit(coroutine), first)

    def initialize(self, timeout: float = INIT_BUDGET_S) -> TelemetryEvent:
        """Run Init ahead of the first invoke, as provisioned concurrency does; returns its platform.initReport."""
        self._bounded(self._submit(self._env.initialize()), timeout, "initialize")
        return self.wait_for_event("platform.initReport", timeout=timeout)

    # ---- what the environment produced ------------------------------------------------------------------------

    @property
    def events(self) -> list[TelemetryEvent]:
        """Every event so far, in order: ``platform.*`` events, ``function`` and ``extension`` log lines, and the
        lifecycle's own ``lambdabox.*`` marks."""
        with self._cond:
            return list(self._events)

    def logs(self, source: str | None = None) -> list[str]:
        """Log lines; ``source`` is "runtime" (the function), an extension's name, or "lambdabox"."""
        return log_lines(self.events, source)

    def platform(self, event_type: str) -> list[Any]:
        """The records of one platform event type, named "report" or "platform.report"."""
        wanted = event_type if event_type.startswith("platform.") else f"platform.{event_type}"
        return [e.record for e in self.events if e.type == wanted]

    def extension_events(self, name: str | None = None) -> list[ExtensionEvent]:
        """The steps each extension (or the one named) went through, in order."""
        steps = (extension_step(event) for event in self.events)
        return [step for step in steps if step is not None and name in (None, step.name)]

    # ---- waiting --------------------------------------------------------------------------------------------------

    def wait_for_event(
        self,
        event_type: str,
        predicate: Callable[[TelemetryEvent], bool] | None = None,
        *,
        timeout: float = 5.0,
        count: int = 1,
    ) -> TelemetryEvent:
        """The ``count``-th event of this type (that ``predicate`` accepts), seen already or within ``timeout``."""
        what = f"event {event_type!r}" + (" matching the predicate" if predicate else "")
        return self._wait(lambda e: e.type == event_type and (predicate is None or predicate(e)), count, timeout, what)

    def wait_for_log(self, text: str, source: str | None = None, *, timeout: float = 5.0) -> TelemetryEvent:
        """The first log line that contains ``text`` (written by ``source``, if given)."""
        what = f"a log line containing {text!r}" + (f" from {source}" if source else "")
        return self._wait(
            lambda e: e.type in LOG_TYPES and text in str(e.record) and source in (None, e.source), 1, timeout, what
        )

    def wait_for_extension(self, name: str, state: str, *, timeout: float = 5.0, count: int = 1) -> ExtensionEvent:
        """The ``count``-th time the extension reached ``state``, one of EXTENSION_STATES."""
        if state not in EXTENSION_STATES:
            raise ValueError(f"unknown extension state {state!r}; choose one of {', '.join(EXTENSION_STATES)}")

        def reached(event: TelemetryEvent) -> bool:
            step = extension_step(event)
            return step is not None and step.name == name and step.state == state

        step = extension_step(self._wait(reached, count, timeout, f"extension {name!r} in state {state}"))
        assert step is not None
        return step

    def _wait(self, match: Callable[[TelemetryEvent], bool], count: int, timeout: float, what: str) -> TelemetryEvent:
        cursor, seen = 0, 0

        def found() -> TelemetryEvent | bool:
            nonlocal cursor, seen
            while cursor < len(self._events):
                cursor += 1
                if match(self._events[cursor - 1]):
                    seen += 1
                    if seen == count:
                        return self._events[cursor - 1]
            return self._closed  # True: nothing more will come

        with self._cond:
            result = self._cond.wait_for(found, timeout)
        if isinstance(result, bool):
            why = "the environment has been shut down" if result else f"waited {timeout:g} s"
            nth = f" (occurrence {count})" if count > 1 else ""
            raise WaitTimedOut(f"{what}{nth} not seen; {why}\n{self.describe()}")
        return result

    # ---- shutting down ----------------------------------------------------------------------------------------

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Shut down as Lambda does (SHUTDOWN to the extensions, SIGKILL at the deadline); returns when every process
        is reaped. Calling it again does nothing."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._bounded(self._owner, timeout, "the shutdown")
        finally:
            self._finish(timeout)

    def describe(self) -> str:
        """What failure messages show: the platform events, the extensions' steps, the last log lines."""
        events = self.events
        platform = [e.type.removeprefix("platform.") for e in events if e.type.startswith("platform.")]
        steps = [f"{step.name} {step.state}" for step in self.extension_events()]
        head = f"function {self.config.logical_id} ({self.config.runtime}): {len(events)} events"
        rows = [head, f"platform events: {', '.join(platform[-15:]) or 'none'}"]
        if steps:
            rows.append(f"extension steps: {', '.join(steps[-15:])}")
        return "\n".join([*rows, last_lines(events)])

    # ---- the loop thread ------------------------------------------------------------------------------------------

    def _bounded(self, future: concurrent.futures.Future[T], timeout: float, what: str) -> T:
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise WaitTimedOut(f"{what} did not end within {timeout:g} s\n{self.describe()}") from None

    async def _own(self, options: Options, ready: concurrent.futures.Future[Environment]) -> None:
        """Open the environment, hand it over, keep it open until shutdown: one task enters and exits it."""
        try:
            async with open_environment(self.config, options, [self._observe]) as env:
                try:
                    ready.set_result(env)
                except concurrent.futures.InvalidStateError:
                    return  # the start timed out meanwhile
                await self._stop.wait()
        except BaseException as error:
            if ready.done():
                raise
            ready.set_exception(error)

    async def _invoke(self, payload: bytes, client_context: str | None) -> tuple[InvokeResult, int]:
        """Invoke; with the invoke's result, how many events there were when it ended (its REPORT the last)."""
        result = await self._env.invoke(payload, client_context=client_context)
        return result, len(self.events)

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` as a task of the loop's group; its result (or error) comes back in the future, and
        cancelling the future cancels the task."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            if self._end.is_set():
                coroutine.close()
                done.cancel()
                return
            task = self._group.create_task(_carry(coroutine, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

            def cancelled(future: concurrent.futures.Future[T]) -> None:
                if future.cancelled():  # a wait that timed out (or the start's): the task goes too
                    self._loop.call_soon_threadsafe(task.cancel)

            done.add_done_callback(cancelled)

        self._loop.call_soon_threadsafe(start)
        return done

    def _run_loop(self, group_ready: threading.Event) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(group_ready))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    async def _main(self, group_ready: threading.Event) -> None:
        """The loop's one task group, until the facade ends it: then whatever still runs (after a start that timed
        out, the environment's own closing) is cancelled and awaited."""
        async with open_task_group() as group:
            self._group = group
            group_ready.set()
            await self._end.wait()
            for task in list(self._tasks):
                task.cancel()

    def _finish(self, timeout: float) -> None:
        self._loop.call_soon_threadsafe(self._end.set)
        self._thread.join(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._cleanup is not None:
            self._cleanup()

    def _observe(self, event: TelemetryEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()


async def _carry(coroutine: Coroutine[Any, Any, T], done: concurrent.futures.Future[T]) -> None:
    """Await ``coroutine`` for a caller in another thread; its error is the caller's, never the group's."""
    try:
        result = await coroutine
    except asyncio.CancelledError:
        done.cancel()
        raise
    except BaseException as error:
        if not done.done():
            done.set_exception(error)
        return
    if not done.done():
        done.set_result(result)
