"""A function's execution environments: warm reuse (the most recent first), Lambda's concurrency limits, keep-alive
and provisioned concurrency (its count held by replacements). Its environments and tasks belong to the task group it
is given; on close every environment is shut down (SHUTDOWN ``spindown``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from lambdabox.core.batching import Backoff
from lambdabox.core.errors import ApiError, ErrorType, Throttled, ThrottleReason
from lambdabox.core.model import FunctionConfig, Outcome
from lambdabox.core.provisioning import REPLACEMENT_BACKOFF, Provisioning, Replace
from lambdabox.core.state import INIT_TIMEOUT_S, SLACK_S
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult, Observer
from lambdabox.loop import open_task_group
from lambdabox.observe.logstore import LogStore
from lambdabox.sandbox.filesystem import staged_signature
from lambdabox.service.slot import PROVISIONED, Slot

DEFAULT_KEEP_ALIVE_S = 300.0


AHEAD_REFILL_S = 0.25
"""After the environment opened ahead is taken, the next is opened this much later (off the taker's cold start)."""

FINISHING_S = 0.05
"""How long an invoke that finds its unit of concurrency held by invokes that have answered and are finishing waits
for one of them before it is throttled (see :meth:`Pool.reserve_soon`)."""


def default_max_concurrency() -> int:
    """Ten concurrent executions per core: most functions under test wait on I/O, and a warm Python environment
    costs tens of MB, so this keeps a laptop responsive; beyond it a clear 429 beats a swapping machine."""
    return 10 * (os.cpu_count() or 1)


class Capacity:
    """The account-wide limit on concurrent executions, shared by every pool of a server."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.finishing = 0  # units of invokes that have answered their caller, their invoke phase not yet over
        self._freed: asyncio.Future[None] | None = None

    def take(self) -> None:
        if self.in_use >= self.limit:
            raise Throttled(ThrottleReason.ACCOUNT)
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


class Pool:
    """The environments of one function. ``reserve`` (or ``reserve_waiting``) a unit of concurrency, then ``run``.
    Its tasks (each environment's, the closings, the provisioned replacements) belong to ``group`` and never raise:
    what goes wrong is told to ``on_problem`` (which must not raise)."""

    def __init__(
        self,
        config: FunctionConfig,
        capacity: Capacity,
        group: asyncio.TaskGroup,
        *,
        options: Options | None = None,
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        observers: Iterable[Observer] = (),
        on_problem: Callable[[str], None] = lambda text: None,
        log_store: LogStore | None = None,
        provisioned_backoff: Backoff = REPLACEMENT_BACKOFF,
        environment_observers: Callable[[], Iterable[Observer]] = tuple,
        ahead: bool = False,
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
        self.finishing = 0  # of the busy: invokes that have answered their caller, their invoke phase not yet over
        self._group = group
        self._idle: list[Slot] = []  # the most recently used last
        self._slots: set[Slot] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._quiet: list[asyncio.Future[None]] = []  # waiters for the moment no invoke is in flight
        self._provisioning = Provisioning(provisioned_backoff)
        self._replacing: set[asyncio.Task[None]] = set()  # provisioned environments due or starting
        self._provisioned_changed = asyncio.Event()
        # ``ahead``: the next cold start's environment is opened before it is needed (its sandbox, staging and APIs:
        # no process starts before its first invoke, so Init is the invoke's, as in Lambda).
        self._ahead_wanted = ahead
        self._ahead: tuple[Slot, asyncio.Task[tuple[object, ...] | None]] | None = None  # and its staging's signature
        self._ahead_refill: asyncio.TimerHandle | None = None

    @property
    def environments(self) -> int:
        return len(self._slots)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def provisioned_idle(self) -> int:
        """Provisioned environments initialised and idle."""
        return sum(1 for slot in self._idle if slot.provisioned and slot.initialized)

    async def start(self) -> None:
        """Start the provisioned environments and wait (bounded by Init's limit) until each has initialised or failed
        (one that failed is replaced in the background); open the next cold start's environment ahead if asked, and
        wait for that too (one that cannot be opened says why at the invoke that takes it)."""
        self._open_ahead()
        async with open_task_group() as starting:
            if self._ahead is not None:
                starting.create_task(self._opened(self._ahead[0]))
            for _ in range(self.config.provisioned_concurrency or 0):
                starting.create_task(self._guarded("starting a provisioned environment", self._provision))

    async def wait_provisioned(self) -> None:
        """Wait until every provisioned environment is initialised and idle, with no replacement under way."""
        while self._replacing or self.provisioned_idle < (self.config.provisioned_concurrency or 0):
            self._provisioned_changed.clear()
            await self._provisioned_changed.wait()

    def reserve(self) -> None:
        """Take a unit of concurrency for one invoke, or raise Throttled (429) as Lambda does."""
        if self._closed:
            raise ApiError(500, ErrorType.SERVICE, "lambdabox is shutting down")
        limit = self.config.reserved_concurrency
        if limit is not None and self.busy >= limit:
            raise Throttled(ThrottleReason.RESERVED)
        self.capacity.take()
        self.busy += 1

    async def reserve_soon(self) -> None:
        """``reserve``; but where the unit it needs is held by invokes that have answered their caller and are
        finishing, wait up to FINISHING_S for one of them to end before throttling. A serial caller's next request
        can arrive before the runtime's and the extensions' /next that end the last invoke: lambdabox's own
        bookkeeping must not throttle it. An extension that works on after the answer still holds its environment,
        and the throttle comes, as on Lambda, once FINISHING_S has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINISHING_S
        while True:
            try:
                return self.reserve()
            except Throttled as throttled:
                holding = self.finishing if throttled.reason == ThrottleReason.RESERVED else self.capacity.finishing
                if not holding or loop.time() >= deadline:
                    raise
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await asyncio.wait({self.capacity.freed()})

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
        slot: Slot | None = None
        answered = False

        def outcome(given: Outcome) -> None:
            nonlocal answered
            if not answered:
                answered = True
                self.finishing += 1
                self.capacity.finishing += 1
            if on_outcome is not None:
                on_outcome(given)

        try:
            slot = self._take_idle()
            fresh = slot is None
            slot = slot or await self._take_ahead() or self._new_slot(self.options)
            try:
                env = await slot.environment()
            except Exception as error:
                self.on_problem(f"lambdabox: {self.config.logical_id}: cannot start an environment: {error}")
                raise
            for line in env.cleaned if fresh else ():
                self.on_problem(f"lambdabox: {line}")
            for line in env.degraded if fresh else ():
                self.on_problem(f"lambdabox: degraded mode: {line}")
            result = await env.invoke(
                payload,
                client_context=client_context,
                invoked_function_arn=invoked_function_arn,
                request_id=request_id,
                on_outcome=outcome,
            )
            return Ran(result, slot.log.tail())
        except BaseException as error:
            if slot is not None:  # its state is unknown: no other invoke gets it
                self._discard(slot, f"its invoke failed: {error!r}")
                slot = None
            raise
        finally:
            if answered:
                self.finishing -= 1
                self.capacity.finishing -= 1
            self._release()
            if slot is not None:
                self._park(slot)
            self._notify_if_quiet()

    def _take_idle(self) -> Slot | None:
        if not self._idle:
            return None
        provisioned = [i for i, slot in enumerate(self._idle) if slot.provisioned]
        slot = self._idle.pop(provisioned[-1] if provisioned else -1)
        slot.cancel_expiry()
        return slot

    def _open_ahead(self) -> None:
        """Open an environment for the next cold start, unless one is open ahead already (or the pool is closed)."""
        self._ahead_refill = None
        if not self._ahead_wanted or self._closed or self._ahead is not None:
            return
        signature = self._group.create_task(self._signature())  # (taken before its staging)
        self._ahead = (self._make_slot(self.options), signature)

    @staticmethod
    async def _opened(slot: Slot) -> None:
        with contextlib.suppress(Exception):
            await slot.environment()

    async def _take_ahead(self) -> Slot | None:
        """The environment opened ahead, if the code and layers it staged are still what they are now; the next is
        opened AHEAD_REFILL_S later. One staged from what has changed since is shut down, and None returned."""
        if self._ahead is None:
            return None
        (slot, signature), self._ahead = self._ahead, None
        if self._ahead_refill is None and not self._closed:
            self._ahead_refill = asyncio.get_running_loop().call_later(AHEAD_REFILL_S, self._open_ahead)
        self._slots.add(slot)
        current = await self._signature()
        if current is not None and await signature == current:
            return slot
        self._discard(slot)
        return None

    async def _signature(self) -> tuple[object, ...] | None:
        """:func:`staged_signature` of the function (off the loop where layers are scanned); None if it cannot be
        had (the opening itself says what is wrong)."""
        try:
            if not self.config.layers and self.config.code.is_dir():
                return staged_signature(self.config)  # (a code directory is used in place: nothing to read)
            return await asyncio.to_thread(staged_signature, self.config)
        except OSError:
            return None

    def _new_slot(self, options: Options) -> Slot:
        slot = self._make_slot(options)
        self._slots.add(slot)
        return slot

    def _make_slot(self, options: Options) -> Slot:
        observers = [*self.observers, *self.environment_observers()]
        return Slot(self._group, self.config, options, observers, self.log_store, self._reset)

    async def _guarded(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        """``work()``, as a task of the group must be: what it raises is told to ``on_problem``, not to the group."""
        try:
            await work()
        except Exception as error:
            self.on_problem(f"lambdabox: {self.config.logical_id}: {what}: {error!r}")

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

    async def _initialize(self, slot: Slot) -> str | None:
        """Run Init ahead of any invoke (bounded by Init's limit): None once it succeeded, else why it did not."""
        limit_s = INIT_TIMEOUT_S + SLACK_S
        try:
            env = await slot.environment()
            async with asyncio.timeout(limit_s):
                initialized = await env.initialize()
        except TimeoutError:
            return f"Init did not end within {limit_s:g} s"
        except Exception as error:
            return repr(error)
        return None if initialized else env.failure or "Init failed"

    def _reset(self, slot: Slot) -> None:
        """The environment lost its Init (a crash, a timeout): an idle provisioned one is replaced now; one that is
        busy or starting is seen by ``_park`` or ``_provision``."""
        if slot.provisioned and slot in self._idle:
            self._idle.remove(slot)
            self._discard(slot, slot.failure)

    def _park(self, slot: Slot) -> None:
        if slot.provisioned and not slot.initialized:  # reset by its invoke: no longer initialised ahead
            self._discard(slot, slot.failure)
            return
        if self._closed or slot not in self._slots:
            self._discard(slot)
            return
        self._idle.append(slot)
        if slot.provisioned:
            self._provisioned_changed.set()
        else:
            slot.expiry = asyncio.get_running_loop().call_later(self.keep_alive_s, self._expire, slot)

    def _expire(self, slot: Slot) -> None:
        slot.expiry = None
        if slot in self._idle:
            self._idle.remove(slot)
            self._discard(slot)

    def _discard(self, slot: Slot, reason: str | None = None) -> None:
        """Take the environment out of the pool and shut it down; a provisioned one is replaced unless closing."""
        if slot not in self._slots:
            return
        self._slots.discard(slot)
        task = self._group.create_task(self._close_slot(slot))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        now = asyncio.get_running_loop().time()
        replace = self._provisioning.left(now, provisioned=slot.provisioned, initialized=slot.inits > 0)
        if replace is not None:
            self._report_left(slot, reason or "discarded", replace)
            self._replace(replace)

    async def _close_slot(self, slot: Slot) -> None:
        try:
            error = await slot.close()
        except Exception as raised:
            error = raised
        if error is not None:
            self.on_problem(f"lambdabox: {self.config.logical_id}: an environment failed: {error!r}")

    def _report_left(self, slot: Slot, reason: str, replace: Replace) -> None:
        what = "was lost" if slot.inits else "did not start"
        when = f"in {replace.delay_s:g} s" if replace.delay_s else "now"
        self.on_problem(
            f"lambdabox: {self.config.logical_id}: a provisioned environment {what}: {reason}; another starts {when}"
        )

    def _replace(self, replace: Replace) -> None:
        work = functools.partial(self._provision, replace.at)
        task = self._group.create_task(self._guarded("replacing a provisioned environment", work))
        self._replacing.add(task)
        task.add_done_callback(self._replaced)

    def _replaced(self, task: asyncio.Task[None]) -> None:
        self._replacing.discard(task)
        self._provisioned_changed.set()

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
        if self._ahead_refill is not None:
            self._ahead_refill.cancel()
        if self._ahead is not None:
            (slot, signature), self._ahead = self._ahead, None
            signature.cancel()
            self._slots.add(slot)  # (shut down with the others)
        for slot in list(self._slots):
            self._discard(slot)
        while self._closing:
            await asyncio.wait(set(self._closing))
