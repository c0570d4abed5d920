"""The event loop every lambdabox entry point runs on: uvloop's (libuv, in C), which takes about a sixth off the
CPU an invoke costs lambdabox's one thread (measured with bench/invoke_api.py); and the task groups that own every
task lambdabox starts; and pipes handed to it without a descriptor closed twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Coroutine
from typing import IO, Any, TypeVar

import uvloop

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on lambdabox's event loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def read_pipe(fd: int) -> IO[bytes]:
    """A file object for a pipe's read end, for ``loop.connect_read_pipe`` on the running loop, which then owns
    ``fd``. On uvloop, libuv closes ``fd`` when the transport closes, and uvloop then closes the file object too:
    a second close of the same number, which closes whatever another thread opened under it in between
    (MagicStack/uvloop#763; 20,000 cycles with a thread opening pipes: EBADF in every run). The file object is
    made not to close it. On asyncio's own loop, the transport closes ``fd`` through the file object."""
    uv = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    return os.fdopen(fd, "rb", buffering=0, closefd=not uv)


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
