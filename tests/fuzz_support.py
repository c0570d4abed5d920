"""What the property-based suites share: an async context (an environment, a server) held open on an event loop in a
thread of its own while hypothesis, which is synchronous, sends it raw HTTP requests; the request strategies; and the
invariants every answer must keep.

Profiles (tests/conftest.py): ``ci`` is the default, derandomized with a fixed number of examples; a longer run is
``pytest tests/api -k fuzz --hypothesis-profile=long``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import strategies as st

from lambdabox.loop import run as run_loop

T = TypeVar("T")
ANSWER_S = 10.0  # every answer comes within this (no request here is a long-poll)


class Background:
    """``factory()``'s async context entered on a loop in a thread; ``value`` is what it gave."""

    def __init__(self, factory: Callable[[], contextlib.AbstractAsyncContextManager[Any]]) -> None:
        self._factory = factory
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.value: Any = None

    def _main(self) -> None:
        async def hold() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                async with self._factory() as value:
                    self.value = value
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as error:
                self._failed = error
                raise
            finally:
                self._ready.set()

        with contextlib.suppress(BaseException):
            run_loop(hold())

    def __enter__(self) -> Background:
        self._thread.start()
        if not self._ready.wait(120) or self._failed is not None:
            raise RuntimeError(f"the background context did not open: {self._failed!r}")
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)
        assert not self._thread.is_alive(), "the background context did not close"
        if self._failed is not None:
            raise self._failed


@contextlib.contextmanager
def background(factory: Callable[[], contextlib.AbstractAsyncContextManager[Any]]) -> Iterator[Background]:
    with Background(factory) as held:
        yield held


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(address: tuple[str, int], request: bytes) -> Answer:
    """Send one raw request on a new connection; the answer (which must come, and parse as HTTP/1.1)."""
    with socket.create_connection(address, timeout=ANSWER_S) as conn:
        conn.sendall(request)
        method = request.split(b" ", 1)[0].decode("latin-1")  # (a HEAD's answer has no body to read)
        response = http.client.HTTPResponse(conn, method=method)
        try:  # (its file object holds the socket open until it is closed)
            response.begin()
            body = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            response.close()


def raw_request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_well_formed(answer: Answer, allowed_5xx: Callable[[Answer], bool] = lambda a: False) -> None:
    """No 5xx but the documented ones, no traceback, and an error body that is JSON where it says it is."""
    assert answer.status < 500 or allowed_5xx(answer), (answer.status, answer.body[:500])
    assert b"Traceback" not in answer.body, answer.body[:2000]
    if answer.status >= 400 and answer.headers.get("content-type") == "application/json":
        assert isinstance(json.loads(answer.body), dict), answer.body[:500]


# ---- strategies ------------------------------------------------------------------------------------------------

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)
"""A header value that can be sent at all: latin-1, no control characters (so no CR or LF)."""
segment = st.one_of(
    st.sampled_from(["", "x", "..", "%2F", "%00", "next", "response", "error", "a" * 300, "$LATEST", "ünï"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"), max_size=20),
).map(lambda s: s.encode("utf-8").decode("latin-1"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
bodies = st.one_of(
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.integers(1_000, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1_000, 50_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO"])
