"""A lean HTTP/1.1 server for every API lambdabox serves: the Invoke API, and the Runtime, Extensions, Logs and
Telemetry APIs of each environment. Routing on method and path, keep-alive, ``Expect: 100-continue``, sized or
chunked bodies (parsed by httptools), requests on one connection answered in order (by a task of the server's task
group), a graceful close, and :class:`Limits` on what clients send (head and body size, time to send a request,
idle time, connections), each refused with a status and an error body, never a traceback. Three exchanges are on
every invoke's critical path, so it does only what these APIs need; an ApiError a handler raises becomes the
Runtime API's error response (the Invoke API renders its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import re
import socket
import sys
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import httptools

from lambdabox.core import jsontext
from lambdabox.core.errors import ApiError, ErrorType, error_body
from lambdabox.loop import open_task_group

MAX_BODY_BYTES = 12 * 1024 * 1024
"""Body bytes kept per request; beyond it the rest is read and dropped, and the request is marked ``oversize``."""
MAX_HEAD_BYTES = 1024 * 1024
"""Request line and headers: Lambda's Runtime API is Go's net/http, whose default ``MaxHeaderBytes`` is 1 MiB (431)."""
MAX_DISCARD_BYTES = 64 * 1024 * 1024
"""A body longer than this is refused (413) without reading it: its connection is closed."""
DRAIN_S = 0.1
"""At a graceful close, how long idle connections stay open for requests already on their way."""
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


@dataclass
class Request:
    method: str
    path: str  # as sent (percent-encoded), without the query
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "
    body: bytes = b""
    oversize: bool = False  # the body was longer than MAX_BODY_BYTES (``body`` holds none of it)
    params: dict[str, str] = field(default_factory=dict)  # the route's {name} parts, percent-decoded
    query_string: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters, decoded (the last of a repeated one wins)."""
        return dict(urllib.parse.parse_qsl(self.query_string, keep_blank_values=True))


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), headers or {})


def error_response(error: ApiError) -> Response:
    return Response(error.status, error.body())


def read_json(request: Request, error_type: ErrorType) -> object:
    """The request body as JSON, or ApiError 400 with ``error_type``; an empty body is ``{}``."""
    if request.oversize:
        raise ApiError(413, ErrorType.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY_BYTES} bytes")
    if not request.body.strip():
        return {}
    try:
        return jsontext.loads(request.body)
    except ValueError as error:
        raise ApiError(400, error_type, f"request body is not valid JSON: {error}") from None


Handler = Callable[[Request], Awaitable[Response]]
Refusal = Callable[[int, str], Response]
"""The answer to a request refused before any handler sees it: its status (400, 408, 413, 429, 431) and a message."""

_REFUSAL_TYPES = {413: ErrorType.REQUEST_ENTITY_TOO_LARGE, 431: ErrorType.REQUEST_ENTITY_TOO_LARGE}


def refusal(status: int, message: str) -> Response:
    """The in-environment APIs' refusal: Lambda's error body (``RequestEntityTooLarge`` for what is too large)."""
    return Response(status, error_body(_REFUSAL_TYPES.get(status, ErrorType.INVALID_REQUEST_FORMAT), message))


@dataclass(frozen=True)
class Limits:
    """What a server takes from its clients. The in-environment APIs take Lambda's (rapid's: no timeouts), with a cap
    on connections so that a function cannot take every descriptor of lambdabox; the Invoke API adds timeouts."""

    max_connections: int = 128  # beyond it a new connection gets 429 and is closed
    request_timeout_s: float | None = None  # from a request's first byte to its last (408, then closed)
    idle_timeout_s: float | None = None  # a connection with nothing asked or answering is closed after it
    refuse: Refusal = refusal


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Router:
    """Routes by method and path; a path's ``{name}`` part matches one segment and lands in ``params``."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" not in path:
            self._exact.setdefault(path, {})[method] = handler
            return
        regex = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))
        for pattern, methods in self._patterns:
            if pattern.pattern == regex.pattern:
                methods[method] = handler
                return
        self._patterns.append((regex, {method: handler}))

    def resolve(self, request: Request) -> Handler | Response:
        """The handler for ``request`` (its ``params`` filled in), or the 404 or 405 answer."""
        methods = self._exact.get(request.path)
        if methods is None:
            for pattern, candidates in self._patterns:
                if (match := pattern.fullmatch(request.path)) is not None:
                    request.params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                    methods = candidates
                    break
            else:
                return Response(404, b"404: Not Found", content_type="text/plain")
        handler = methods.get(request.method)
        if handler is None:
            return Response(405, b"405: Method Not Allowed", {"Allow": ", ".join(methods)}, "text/plain")
        return handler


async def _answer(router: Router, request: Request) -> Response:
    found = router.resolve(request)
    if isinstance(found, Response):
        return found
    try:
        return await found(request)
    except ApiError as error:
        return error_response(error)


def _encode(response: Response, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}"]
    if response.status != 204:  # (a 204 has neither)
        lines += [f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}"]
    lines += [f"{name}: {value}" for name, value in response.headers.items()]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()  # (UTF-8 in a value passes through, as aiohttp has it)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them one after another, in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[tuple[Request, bool]] = deque()
        self._task: asyncio.Task[None] | None = None  # answering the queued requests, one after another
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._head = 0  # bytes received since the last request's end, while its headers are not whole
        self._fields = 0  # bytes of the URL, header names and values of the request being received
        self._in_body = False  # the headers of the request being received are whole
        self.receiving = False  # a request begun and not yet whole
        self.since = 0.0  # (loop time) when the request being received began, or the connection became idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream's (uvloop's is no subclass)
        self.since = asyncio.get_running_loop().time()
        if len(self._server.connections) >= self._server.limits.max_connections:
            self.refuse(429, f"lambdabox: over {self._server.limits.max_connections} connections to this API")
            return
        self._server.connections.add(self)
        if self._server.closed:  # accepted as the server closed: nothing more is answered
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        self._queue.clear()  # an answer in progress runs to its end (the core expects it), unwritten

    def data_received(self, data: bytes) -> None:
        if not self._in_body:  # (httptools joins a header's pieces itself: counted here, before it does)
            self._head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if not isinstance(refused := error.__context__, _Refused):
                raise
            self.refuse(refused.status, str(refused))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            self.refuse(400, f"bad request: {error}")
        else:
            if not self._in_body and self._head > MAX_HEAD_BYTES:
                self.refuse(431, f"request line and headers over {MAX_HEAD_BYTES} bytes")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ---- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._fields = 0
        self.receiving = True
        self.since = asyncio.get_running_loop().time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._fields += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += len(name) + len(value)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._in_body = True
        if self._fields > MAX_HEAD_BYTES:  # (a head that ended in the piece that took it over the limit)
            raise _Refused(431, f"request line and headers over {MAX_HEAD_BYTES} bytes")
        if (length := self._headers.get("content-length", "")).isdigit() and int(length) > MAX_DISCARD_BYTES:
            raise _Refused(413, f"request body of {length} bytes is over {MAX_DISCARD_BYTES} bytes")
        expect = self._headers.get("expect", "").lower()
        if expect == "100-continue" and self._transport is not None:
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_DISCARD_BYTES:
            raise _Refused(413, f"request body over {MAX_DISCARD_BYTES} bytes")
        if self._size <= MAX_BODY_BYTES:
            self._body.append(body)
        else:
            self._body = []

    def on_message_complete(self) -> None:
        self.receiving = self._in_body = False
        self._head = 0
        path, _, query = self._url.decode("latin-1").partition("?")
        method = self._parser.get_method().decode("latin-1")
        oversize = self._size > MAX_BODY_BYTES
        request = Request(method, path, self._headers, b"".join(self._body), oversize, query_string=query)
        self._queue.append((request, self._parser.should_keep_alive()))
        if self._task is None:
            self._task = self._server.start_answering(self)

    # ---- answering --------------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer the queued requests, one after another; never raises (a task of the server's group)."""
        try:
            while self._queue:
                request, keep_alive = self._queue.popleft()
                try:
                    response = await _answer(self._server.router, request)
                except Exception as error:  # a handler's bug: answered, not left hanging
                    response = Response(500, error_body(ErrorType.SERVICE, repr(error)))
                if self._transport is None or self._transport.is_closing():
                    return
                keep_alive = keep_alive and not self._server.closing
                body = b"" if request.method == "HEAD" else response.body  # (its Content-Length says the size)
                self._transport.writelines([_encode(response, keep_alive), body])
                if not keep_alive:
                    self._transport.close()
                    return
        except Exception as error:  # lambdabox's bug: this connection ends, the others are served on
            print(f"lambdabox: the HTTP server failed to answer: {error!r}", file=sys.stderr, flush=True)
            self.close()
        finally:
            self._task = None
            self.since = asyncio.get_running_loop().time()

    @property
    def idle(self) -> bool:
        return self._task is None

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (no handler sees the request) and close the connection."""
        if self._transport is not None and not self._transport.is_closing():
            response = self._server.limits.refuse(status, message)
            self._transport.writelines([_encode(response, False), response.body])
            self._transport.close()


class HttpServer:
    """Serves ``router`` on any number of listening sockets until ``close``; each connection's answers are a task of
    ``group``. Use :func:`open_http_server`, which owns the group."""

    def __init__(self, router: Router, group: asyncio.TaskGroup, limits: Limits | None = None) -> None:
        self.router = router
        self.limits = limits or Limits()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # answers in progress (some may outlive their connection)
        self.closing = False  # no new connections; each answer in progress closes its connection once given
        self.closed = False  # nothing more is answered: a request arriving now closes its connection
        self._group = group
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None  # closes the connections over their time limits

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); the address bound."""
        server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port)
        self._serving(server)
        address: tuple[str, int] = server.sockets[0].getsockname()[:2]
        return address

    async def serve_socket(self, listener: socket.socket) -> None:
        """Serve on a socket already bound and listening (owned by the server from here on)."""
        server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), sock=listener)
        self._serving(server)

    def _serving(self, server: asyncio.Server) -> None:
        self._servers.append(server)
        limits = self.limits
        timeouts = [t for t in (limits.request_timeout_s, limits.idle_timeout_s) if t is not None]
        if timeouts and self._sweeper is None:
            self._sweeper = self._group.create_task(self._sweep(min(1.0, max(0.01, min(timeouts) / 4))))

    async def _sweep(self, every_s: float) -> None:
        """Every ``every_s``: a request taking too long to arrive gets 408; a connection idle too long is closed."""
        loop, request_s, idle_s = asyncio.get_running_loop(), self.limits.request_timeout_s, self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(every_s)
            now = loop.time()
            for connection in list(self.connections):
                if connection.receiving:
                    if request_s is not None and now - connection.since > request_s:
                        connection.refuse(408, f"the request was not received whole within {request_s:g} s")
                elif idle_s is not None and connection.idle and now - connection.since > idle_s:
                    connection.close()

    def start_answering(self, connection: _Connection) -> asyncio.Task[None] | None:
        """A task of the group answering ``connection``'s requests; none once closed (the connection is closed)."""
        if self.closed:
            connection.close()
            return None
        task = self._group.create_task(connection.serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop listening and close the idle connections; let the answers in progress be given (each then closes
        its connection) for up to ``grace_s``; then cancel what is left and close every connection.

        With a grace, no request a client has sent is lost: the connections waiting to be accepted are accepted,
        and the idle ones are closed only after a moment (``DRAIN_S``, waited only if a connection is open) in which
        requests already on their way arrive; each is answered (and its connection closed) within the grace."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if grace_s > 0:
            for server in self._servers:
                await self._accept_waiting(server)
        for server in self._servers:
            server.close()
        if grace_s > 0 and self.connections:  # (with no connection open, no request can be on its way)
            await asyncio.sleep(min(grace_s, DRAIN_S))
        for connection in [c for c in self.connections if c.idle and not c.receiving]:
            connection.close()
        if self.tasks and grace_s > 0:
            await asyncio.wait(set(self.tasks), timeout=grace_s)
        self.closed = True
        for connection in list(self.connections):
            connection.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _accept_waiting(self, server: asyncio.Server) -> None:
        """Accept the connections in ``server``'s backlog (closing it would reset them, their requests unread)."""
        loop = asyncio.get_running_loop()
        for listener in server.sockets:
            with socket.socket(fileno=os.dup(listener.fileno())) as duplicate:
                duplicate.setblocking(False)
                while True:
                    try:
                        accepted, _ = duplicate.accept()
                    except OSError:  # BlockingIOError: none waiting
                        break
                    accepted.setblocking(False)
                    await loop.connect_accepted_socket(lambda: _Connection(self), accepted)


@contextlib.asynccontextmanager
async def open_http_server(router: Router, limits: Limits | None = None) -> AsyncIterator[HttpServer]:
    """An :class:`HttpServer` for ``router``, listening nowhere yet, owning a task group for its answers; on exit,
    ``close()`` (no grace) unless closed already, and nothing it started is left running."""
    async with open_task_group() as group:
        server = HttpServer(router, group, limits)
        try:
            yield server
        finally:
            if not server.closed:
                await server.close()
