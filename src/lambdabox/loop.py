"""The event loop every lambdabox entry point runs on: uvloop's (libuv, in C), which takes about a sixth off the
CPU an invoke costs lambdabox's one thread (measured with bench/invoke_api.py); and the task groups that own every
task lambdabox starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on lambdabox's event loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


@contextlib.asynccontextmanager
async def open_task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An ``asyncio.TaskGroup`` whose owner's own exception comes out as itself, not wrapped in an exception group
    (the group's tasks are written never to fail; when one does, the group is raised as it is)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
