"""lambdabox's event loop: a read pipe handed to it is closed exactly once, on uvloop as on asyncio's own loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from lambdabox.loop import read_pipe

T = TypeVar("T")
LOOPS = pytest.mark.parametrize("new_loop", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])


def on(new_loop: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(asyncio.wait_for(main, 60))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Drained(asyncio.Protocol):
    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set_result(None)


@LOOPS
def test_the_file_object_closes_the_descriptor_only_where_the_loop_does_not(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """uvloop closes the file object after libuv has closed the descriptor; that second close must do nothing."""

    async def main() -> bool:
        r, w = os.pipe()
        read_pipe(r).close()
        still_open = is_open(r)
        for fd in (r, w) if still_open else (w,):
            os.close(fd)
        return still_open

    assert on(new_loop, main()) is (new_loop is uvloop.new_event_loop)


@LOOPS
def test_the_transport_closes_the_descriptor_and_leaves_none_open(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> tuple[list[bool], int]:
        loop, closed = asyncio.get_running_loop(), []

        async def drain() -> None:
            r, w = os.pipe()
            _, protocol = await loop.connect_read_pipe(_Drained, read_pipe(r))
            os.close(w)
            await protocol.done
            closed.append(not is_open(r))

        await drain()  # (libuv opens /dev/null once, at the first pipe)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(2_000):
            await drain()
        return closed, len(os.listdir("/proc/self/fd")) - before

    closed, left_open = on(new_loop, main())
    assert all(closed) and left_open <= 0


@LOOPS
def test_no_descriptor_of_another_thread_is_closed_under_it(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """20,000 pipes read to EOF while another thread opens, uses and closes pipes of its own. With the file object
    closing the descriptor too (MagicStack/uvloop#763), that thread saw EBADF or EPIPE in most runs."""

    async def main() -> list[str]:
        stop, problems = threading.Event(), []

        def other() -> None:
            while not stop.is_set():
                r, w = os.pipe()
                try:
                    os.write(w, b"x")
                    if os.read(r, 1) != b"x":
                        problems.append("read another pipe's byte")
                except OSError as error:
                    problems.append(repr(error))
                finally:
                    for fd in (r, w):
                        try:
                            os.close(fd)
                        except OSError as error:
                            problems.append(f"close: {error!r}")

        thread = threading.Thread(target=other)
        thread.start()
        try:
            loop = asyncio.get_running_loop()
            for _ in range(20_000):
                r, w = os.pipe()
                _, protocol = await loop.connect_read_pipe(_Drained, read_pipe(r))
                os.close(w)
                await protocol.done
        finally:
            stop.set()
            thread.join()
        return problems

    assert on(new_loop, main()) == []
