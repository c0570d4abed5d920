"""How records reach a subscriber's listener: an HTTP POST of a JSON array per batch (2xx is delivered), or NDJSON
on one TCP connection (a write the kernel took is delivered: TCP has no acknowledgement, as AWS documents), each
bounded by a request timeout, made where the subscribers listen (:data:`SocketFactory`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from lambdabox.core.telemetry import Destination

if TYPE_CHECKING:
    import aiohttp
    import yarl

MAX_ANSWER_BYTES = 64 * 1024  # of a subscriber's HTTP answer body; the rest is not read

SocketFactory = Callable[[int, int, int], socket.socket]
"""Makes a socket (family, type, proto) where the subscribers listen, such as the environment's network namespace
(:meth:`lambdabox.sandbox.held.Holder.socket`); without one, connections are made from here."""


class HttpSender:
    """POSTs a JSON array and waits for the answer: 2xx is delivered, anything else (or no answer) failed."""

    def __init__(self, destination: Destination, timeout_s: float, factory: SocketFactory | None = None) -> None:
        host, port = destination.connect_host, destination.port
        self._factory = factory
        self._url: str | yarl.URL = f"http://{_bracket(host)}:{port}{destination.path}"  # yarl's with the session
        self._headers = {"Content-Type": "application/json", "Host": f"{_bracket(destination.host)}:{port}"}
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def send(self, batch: list[bytes]) -> bool:
        http = _aiohttp()
        if self._session is None:
            factory = self._factory
            connector = http.TCPConnector(
                limit=1, socket_factory=None if factory is None else (lambda info: factory(*info[:3]))
            )
            self._session = http.ClientSession(connector=connector, timeout=http.ClientTimeout(total=self._timeout_s))
            self._url = _yarl().URL(self._url, encoded=True)  # (as given: no re-quoting)
        body = b"[" + b",".join(batch) + b"]"
        try:
            async with self._session.post(self._url, data=body, headers=self._headers) as response:
                await response.content.read(MAX_ANSWER_BYTES)
                return 200 <= response.status < 300
        except (http.ClientError, OSError, TimeoutError, ValueError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TcpSender:
    """Writes NDJSON on one connection, reconnecting after a failure. TCP has no acknowledgement: a write the
    kernel accepted counts as delivered (AWS documents the same limitation)."""

    def __init__(self, destination: Destination, timeout_s: float, factory: SocketFactory | None = None) -> None:
        self._host, self._port, self._timeout = destination.connect_host, destination.port, timeout_s
        self._factory = factory
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, batch: list[bytes]) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                if self._writer is None or self._writer.is_closing() or (self._reader and self._reader.at_eof()):
                    await self.close()
                    self._reader, self._writer = await self._connect()
                self._writer.write(b"\n".join(batch) + b"\n")
                await self._writer.drain()
            return True
        except (OSError, TimeoutError):
            await self.close()
            return False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._factory is None:
            return await asyncio.open_connection(self._host, self._port)
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET  # a loopback address (Destination)
        sock = self._factory(family, socket.SOCK_STREAM, 0)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (self._host, self._port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


@functools.cache
def _aiohttp() -> ModuleType:
    """aiohttp, imported at the first delivery over HTTP rather than with lambdabox: its import (it builds an SSL
    context) was about a third of lambdabox's start-up, for a client that only subscribers need."""
    import aiohttp

    return aiohttp


@functools.cache
def _yarl() -> ModuleType:
    import yarl

    return yarl


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
