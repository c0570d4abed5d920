"""A function's execution environments: warm reuse (the most recent first), Lambda's concurrency limits, keep-alive
and provisioned concurrency (its count held by replacements). Every environment and background task is owned by its
pool; on close the tasks are cancelled and the environments shut down (SHUTDOWN ``spindown``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.batching import Backoff
from lambdabox.core.errors import ApiError
from lambdabox.core.model import FunctionConfig, Outcome
from lambdabox.core.provisioning import REPLACEMENT_BACKOFF, Provisioning, Replace
from lambdabox.core.state import INIT_TIMEOUT_S
from lambdabox.environment.opening import Options
from lambdabox.environment.report import InvokeResult, Observer, TelemetryEvent
from lambdabox.environment.runner import SHUTDOWN_SLACK_S, Environment
from lambdabox.observe.console import format_event
from lambdabox.observe.logstore import LogStore, open_logged_environment

DEFAULT_KEEP_ALIVE_S = 300.0
TAIL_BYTES = 4096
PROVISIONED = "provisioned-concurrency"


def default_max_concurrency() -> int:
    """Ten concurrent executions per core: most functions under test wait on I/O, and a warm Python environment
    costs tens of MB, so this keeps a laptop responsive; beyond it a clear 429 beats a swapping machine."""
    return 10 * (os.cpu_count() or 1)


class Throttled(ApiError):
    """No execution environment may be started for this invoke: Lambda's 429 with its ``Reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(429, "TooManyRequestsException", "Rate Exceeded.")
        self.reason = reason


class Capacity:
    """The account-wide limit on concurrent executions, shared by every pool of a server."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._freed: asyncio.Future[None] | None = None

    def take(self) -> None:
        if self.in_use >= self.limit:
            raise Throttled("ConcurrentInvocationLimitExceeded")
        self.in_use += 1

    def give_back(self) -> None:
        self.in_use -= 1
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)
        self._freed = None

    def freed(self) -> asyncio.Future[None]:
        """Done when any unit is given back (await it through ``asyncio.wait``: it is shared)."""
        if self._freed is None:
            self._freed = asyncio.get_running_loop().create_future()
        return self._freed


@dataclass(frozen=True)
class Ran:
    """An invoke whose invoke phase is over, and the tail of its log (as Lambda's ``X-Amz-Log-Result`` has it)."""

    result: InvokeResult
    log_tail: bytes

    @property
    def log_result(self) -> str:
        return base64.b64encode(self.log_tail).decode()


class _Watch:
    """Observes one environment: the log lines of the invoke in progress (the last 4 KB), whether it is initialised,
    and the last failure seen (why an Init failed, or why the environment was reset, which loses its Init)."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.lines: deque[bytes] = deque()
        self.size = 0
        self.init_ended = asyncio.Event()  # the first Init succeeded, failed, or was cut short by a reset
        self.initialized = False  # an Init succeeded and no reset followed
        self.inits = 0  # successful Inits
        self.failure: str | None = None
        self._on_reset = on_reset

    def __call__(self, event: TelemetryEvent) -> None:
        record: Any = event.record
        match event.type:
            case "platform.start":
                self.lines.clear()
                self.size = 0
            case "platform.initReport":
                self.initialized = record.get("status") == "success"
                if self.initialized:
                    self.inits += 1
                else:
                    self.failure = f"Init failed: {record.get('errorType')}"
                self.init_ended.set()
            case mark.INVOKE_END if record.get("status") != "success":
                self.failure = str(record.get("errorType"))
            case mark.PROCESS_EXIT:
                self.failure = f"{record.get('name', 'the runtime')} exited: {record.get('description')}"
            case mark.SHUTDOWN_START if record.get("reset"):
                self.initialized = False
                self.failure = self.failure or f"reset ({record.get('reason')})"
                self.init_ended.set()
                self._on_reset()
        line = format_event(event)
        if line is None:
            return
        data = (line + "\n").encode()
        self.lines.append(data)
        self.size += len(data)
        while self.size - len(self.lines[0]) >= TAIL_BYTES:
            self.size -= len(self.lines.popleft())

    def tail(self) -> bytes:
        return b"".join(self.lines)[-TAIL_BYTES:]


class _Slot:
    """One environment, opened and closed by a task of its own (so that no caller's cancellation tears it)."""

    def __init__(
        self,
        config: FunctionConfig,
        options: Options,
        observers: list[Observer],
        log_store: LogStore | None = None,
        on_reset: Callable[[_Slot], None] = lambda slot: None,
    ) -> None:
        self.log_store = log_store
        self.provisioned = options.initialization_type == PROVISIONED
        self.watch = _Watch(lambda: on_reset(self))
        self.expiry: asyncio.TimerHandle | None = None
        self._env: asyncio.Future[Environment] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._own(config, options, [self.watch, *observers]))

    async def _own(self, config: FunctionConfig, options: Options, observers: list[Observer]) -> BaseException | None:
        try:
            async with open_logged_environment(config, options, observers, self.log_store) as env:
                self._env.set_result(env)
                await self._stop.wait()
        except Exception as error:
            if not self._env.done():  # it never opened: the invoke that needed it reports the error
                self._env.set_exception(error)
                return None
            return error
        return None

    async def environment(self) -> Environment:
        return await asyncio.shield(self._env)

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    async def close(self) -> BaseException | None:
        """Shut the environment down as Lambda does and wait (bounded by the environment's own deadlines)."""
        self.cancel_expiry()
        self._stop.set()
        error = await self._task
        if self._env.done() and not self._env.cancelled():
            self._env.exception()  # retrieved: an opening failure was reported to the invoke that needed it
        return error


class Pool:
    """The environments of one function. ``reserve`` (or ``reserve_waiting``) a unit of concurrency, then ``run``."""

    def __init__(
        self,
        config: FunctionConfig,
        capacity: Capacity,
        *,
        options: Options | None = None,
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        observers: Iterable[Observer] = (),
        on_problem: Callable[[str], None] = lambda text: None,
        log_store: LogStore | None = None,
        provisioned_backoff: Backoff = REPLACEMENT_BACKOFF,
        environment_observers: Callable[[], Iterable[Observer]] = tuple,
    ) -> None:
        self.config = config
        self.log_store = log_store  # where each environment's log lines are kept (none: nowhere)
        self.capacity = capacity
        self.options = dataclasses.replace(options or Options(), initialization_type="on-demand")
        self.keep_alive_s = keep_alive_s
        self.observers = list(observers)  # observe every environment of the pool
        self.environment_observers = environment_observers  # called for each new environment: observers of its own
        self.on_problem = on_problem
        self.busy = 0
        self._idle: list[_Slot] = []  # the most recently used last
        self._slots: set[_Slot] = set()
        self._closing: set[asyncio.Task[BaseException | None]] = set()
        self._closed = False
        self._quiet: list[asyncio.Future[None]] = []  # waiters for the moment no invoke is in flight
        self._provisioning = Provisioning(provisioned_backoff)
        self._replacing: set[asyncio.Task[None]] = set()  # provisioned environments due or starting
        self._provisioned_changed = asyncio.Event()

    @property
    def environments(self) -> int:
        return len(self._slots)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def provisioned_idle(self) -> int:
        """Provisioned environments initialised and idle."""
        return sum(1 for slot in self._idle if slot.provisioned and slot.watch.initialized)

    async def start(self) -> None:
        """Start the provisioned environments and wait (bounded by Init's limit) until each has initialised or failed
        (one that failed is replaced in the background)."""
        await asyncio.gather(*(self._provision() for _ in range(self.config.provisioned_concurrency or 0)))

    async def wait_provisioned(self) -> None:
        """Wait until every provisioned environment is initialised and idle, with no replacement under way."""
        while self._replacing or self.provisioned_idle < (self.config.provisioned_concurrency or 0):
            self._provisioned_changed.clear()
            await self._provisioned_changed.wait()

    def reserve(self) -> None:
        """Take a unit of concurrency for one invoke, or raise Throttled (429) as Lambda does."""
        if self._closed:
            raise ApiError(500, "ServiceException", "lambdabox is shutting down")
        limit = self.config.reserved_concurrency
        if limit is not None and self.busy >= limit:
            raise Throttled("ReservedFunctionConcurrentInvocationLimitExceeded")
        self.capacity.take()
        self.busy += 1

    async def reserve_waiting(self, timeout_s: float) -> None:
        """``reserve`` as soon as a unit is free, within ``timeout_s`` (TimeoutError after)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    return self.reserve()
                except Throttled:
                    await asyncio.wait({self.capacity.freed()})

    def give_back(self) -> None:
        """Return a unit taken by ``reserve`` that ``run`` will not use."""
        self._release()
        self._notify_if_quiet()

    async def wait_quiet(self) -> None:
        """Wait until no invoke is in flight and every environment they used is back in the pool."""
        if self.busy:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._quiet.append(waiter)
            await waiter

    def _release(self) -> None:
        self.busy -= 1
        self.capacity.give_back()

    def _notify_if_quiet(self) -> None:
        if self.busy == 0:
            waiters, self._quiet = self._quiet, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def run(
        self,
        payload: bytes,
        *,
        request_id: str,
        client_context: str | None = None,
        invoked_function_arn: str | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> Ran:
        """Invoke on a unit reserved before (given back here whatever happens), in the warm environment used most
        recently (provisioned ones first) or a new one; returns when the invoke phase is over."""
        slot: _Slot | None = None
        try:
            slot = self._take_idle()
            fresh = slot is None
            slot = slot or self._new_slot(self.options)
            try:
                env = await slot.environment()
            except Exception as error:
                self.on_problem(f"lambdabox: {self.config.logical_id}: cannot start an environment: {error}")
                raise
            for line in env.degraded if fresh else ():
                self.on_problem(f"lambdabox: degraded mode: {line}")
            result = await env.invoke(
                payload,
                client_context=client_context,
                invoked_function_arn=invoked_function_arn,
                request_id=request_id,
                on_outcome=on_outcome,
            )
            return Ran(result, slot.watch.tail())
        except BaseException as error:
            if slot is not None:  # its state is unknown: no other invoke gets it
                self._discard(slot, f"its invoke failed: {error!r}")
                slot = None
            raise
        finally:
            self._release()
            if slot is not None:
                self._park(slot)
            self._notify_if_quiet()

    def _take_idle(self) -> _Slot | None:
        if not self._idle:
            return None
        provisioned = [i for i, slot in enumerate(self._idle) if slot.provisioned]
        slot = self._idle.pop(provisioned[-1] if provisioned else -1)
        slot.cancel_expiry()
        return slot

    def _new_slot(self, options: Options) -> _Slot:
        observers = [*self.observers, *self.environment_observers()]
        slot = _Slot(self.config, options, observers, self.log_store, self._reset)
        self._slots.add(slot)
        return slot

    async def _provision(self, at: float | None = None) -> None:
        """Start a provisioned environment (at ``at`` on the loop's clock), run its Init and park it; or discard it,
        which replaces it."""
        if at is not None:
            await asyncio.sleep(at - asyncio.get_running_loop().time())
        slot = self._new_slot(dataclasses.replace(self.options, initialization_type=PROVISIONED))
        failure = await self._initialize(slot)
        if failure is None:
            self._provisioning.initialized()
            self._park(slot)
        else:
            self._discard(slot, failure)

    async def _initialize(self, slot: _Slot) -> str | None:
        """Run Init ahead of any invoke (bounded by Init's limit): None once it succeeded, else why it did not."""
        limit_s = INIT_TIMEOUT_S + SHUTDOWN_SLACK_S
        try:
            env = await slot.environment()
            await env.initialize()
            async with asyncio.timeout(limit_s):
                await slot.watch.init_ended.wait()
        except TimeoutError:
            return f"Init did not end within {limit_s:g} s"
        except Exception as error:
            return repr(error)
        return None if slot.watch.initialized else slot.watch.failure

    def _reset(self, slot: _Slot) -> None:
        """The environment lost its Init (a crash, a timeout): an idle provisioned one is replaced now; one that is
        busy or starting is seen by ``_park`` or ``_provision``."""
        if slot.provisioned and slot in self._idle:
            self._idle.remove(slot)
            self._discard(slot, slot.watch.failure)

    def _park(self, slot: _Slot) -> None:
        if slot.provisioned and not slot.watch.initialized:  # reset by its invoke: no longer initialised ahead
            self._discard(slot, slot.watch.failure)
            return
        if self._closed or slot not in self._slots:
            self._discard(slot)
            return
        self._idle.append(slot)
        if slot.provisioned:
            self._provisioned_changed.set()
        else:
            slot.expiry = asyncio.get_running_loop().call_later(self.keep_alive_s, self._expire, slot)

    def _expire(self, slot: _Slot) -> None:
        slot.expiry = None
        if slot in self._idle:
            self._idle.remove(slot)
            self._discard(slot)

    def _discard(self, slot: _Slot, reason: str | None = None) -> None:
        """Take the environment out of the pool and shut it down; a provisioned one is replaced unless closing."""
        if slot not in self._slots:
            return
        self._slots.discard(slot)
        task = asyncio.create_task(slot.close())
        self._closing.add(task)
        task.add_done_callback(self._closed_one)
        now = asyncio.get_running_loop().time()
        replace = self._provisioning.left(now, provisioned=slot.provisioned, initialized=slot.watch.inits > 0)
        if replace is not None:
            self._report_left(slot, reason or "discarded", replace)
            self._replace(replace)

    def _report_left(self, slot: _Slot, reason: str, replace: Replace) -> None:
        what = "was lost" if slot.watch.inits else "did not start"
        when = f"in {replace.delay_s:g} s" if replace.delay_s else "now"
        self.on_problem(
            f"lambdabox: {self.config.logical_id}: a provisioned environment {what}: {reason}; another starts {when}"
        )

    def _replace(self, replace: Replace) -> None:
        task = asyncio.create_task(self._provision(replace.at))
        self._replacing.add(task)
        task.add_done_callback(self._replaced)

    def _replaced(self, task: asyncio.Task[None]) -> None:
        self._replacing.discard(task)
        self._provisioned_changed.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            self.on_problem(f"lambdabox: {self.config.logical_id}: replacing a provisioned environment: {error!r}")

    def _closed_one(self, task: asyncio.Task[BaseException | None]) -> None:
        self._closing.discard(task)
        error = None if task.cancelled() else task.exception() or task.result()
        if error is not None:
            self.on_problem(f"lambdabox: {self.config.logical_id}: an environment failed: {error!r}")

    async def close(self) -> None:
        """Cancel the replacements under way, shut every environment down, idle or not, concurrently; each within its
        own deadlines."""
        self._closed = True
        self._provisioning.close()
        for task in self._replacing:
            task.cancel()
        if self._replacing:
            await asyncio.wait(set(self._replacing))
        self._idle.clear()
        for slot in list(self._slots):
            self._discard(slot)
        while self._closing:
            await asyncio.wait(set(self._closing))
