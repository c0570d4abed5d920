"""One environment of a pool, opened and held by a task of the pool's group, and the tail of its log that
``X-Amz-Log-Result`` carries. What the environment holds (an Init, how many, the last failure) is its own typed state.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable

from lambdabox.core.model import FunctionConfig
from lambdabox.environment.options import Options
from lambdabox.environment.report import Observer, TelemetryEvent
from lambdabox.environment.runner import Environment
from lambdabox.observe.console import format_event
from lambdabox.observe.logstore import LogStore, open_logged_environment

TAIL_BYTES = 4096
PROVISIONED = "provisioned-concurrency"


class LogTail:
    """Observes one environment for the log lines of the invoke in progress, from its START on (the last 4 KB)."""

    def __init__(self) -> None:
        self.lines: deque[bytes] = deque()
        self.size = 0

    def __call__(self, event: TelemetryEvent) -> None:
        if event.type == "platform.start":
            self.lines.clear()
            self.size = 0
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


class Slot:
    """One environment, opened and closed by a task of the pool's group (so that no caller's cancellation tears it)."""

    def __init__(
        self,
        group: asyncio.TaskGroup,
        config: FunctionConfig,
        options: Options,
        observers: list[Observer],
        log_store: LogStore | None = None,
        on_reset: Callable[[Slot], None] = lambda slot: None,
    ) -> None:
        self.log_store = log_store
        self.provisioned = options.initialization_type == PROVISIONED
        self.log = LogTail()
        self.expiry: asyncio.TimerHandle | None = None
        self.env: Environment | None = None  # once opened
        self._opened: asyncio.Future[Environment] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._on_reset = on_reset
        self._task = group.create_task(self._own(config, options, [self.log, *observers]))

    async def _own(self, config: FunctionConfig, options: Options, observers: list[Observer]) -> BaseException | None:
        """Open the environment and hold it until ``close``. Raises nothing into the group: an error goes to the invoke
        that needed the environment (it never opened) or back to ``close``."""
        try:
            on_reset = functools.partial(self._on_reset, self)
            async with open_logged_environment(config, options, observers, self.log_store, on_reset=on_reset) as env:
                self.env = env
                self._opened.set_result(env)
                await self._stop.wait()
        except Exception as error:
            if not self._opened.done():  # it never opened: the invoke that needed it reports the error
                self._opened.set_exception(error)
                return None
            return error
        finally:
            self._opened.cancel()  # (if it never opened: its waiters end with the task)
        return None

    @property
    def initialized(self) -> bool:
        return self.env is not None and self.env.initialized

    @property
    def inits(self) -> int:
        return self.env.inits if self.env is not None else 0

    @property
    def failure(self) -> str | None:
        return self.env.failure if self.env is not None else None

    async def environment(self) -> Environment:
        return await asyncio.shield(self._opened)

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    async def close(self) -> BaseException | None:
        """Shut the environment down as Lambda does and wait (bounded by the environment's own deadlines)."""
        self.cancel_expiry()
        self._stop.set()
        error = await self._task
        if self._opened.done() and not self._opened.cancelled():
            self._opened.exception()  # retrieved: an opening failure was reported to the invoke that needed it
        return error
