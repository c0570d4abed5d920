"""The environment's HTTP server over real sockets, byte by byte: keep-alive, pipelining, 100-continue, chunked and
oversize bodies, HTTP/1.0, routing misses, and how handler errors are answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lambdabox.api import httpserver
from lambdabox.api.httpserver import Request, Response, Router, json_response, open_http_server
from lambdabox.core.errors import ApiError, ErrorType
from lambdabox.loop import open_task_group
from support import run


async def echo(request: Request) -> Response:
    body = {"method": request.method, "path": request.path, "params": request.params, "size": len(request.body)}
    body |= {"oversize": request.oversize, "x": request.header("X-Thing"), "text": request.body[:64].decode()}
    return json_response(body, headers={"X-Echo": "1"})


async def refuse(request: Request) -> Response:
    raise ApiError(403, ErrorType.INVALID_STATE_TRANSITION, "not now")


async def broken(request: Request) -> Response:
    raise RuntimeError("a bug")


async def wait(request: Request) -> Response:
    await asyncio.sleep(0.05)  # holds the first answer back; the second, pipelined behind it, must wait its turn
    return json_response({"waited": True})


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[str, int]]:
    router = Router()
    router.add("POST", "/echo", echo)
    router.add("GET", "/echo", echo)
    router.add("POST", "/items/{item_id}/things", echo)
    router.add("GET", "/refuse", refuse)
    router.add("GET", "/broken", broken)
    router.add("GET", "/wait", wait)
    async with open_http_server(router) as server:
        yield await server.listen("127.0.0.1", 0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


def exchange(*writes: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``writes`` one after another on one connection; read ``responses`` answers."""

    async def go() -> list[tuple[int, dict[str, str], bytes]]:
        async with serving() as (host, port):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                for data in writes:
                    writer.write(data)
                    await writer.drain()
                return [await read_response(reader) for _ in range(responses)]
            finally:
                writer.close()

    return run(go(), timeout=15)


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_keep_alive_answers_each_request_in_turn_with_length_and_type() -> None:
    first, second = exchange(post("/echo", b"one", "X-Thing: a"), post("/echo?q=1", b"two!"), responses=2)
    for (status, headers, body), (size, text) in zip((first, second), ((3, "one"), (4, "two!")), strict=True):
        assert status == 200 and headers["content-type"] == "application/json" and headers["x-echo"] == "1"
        assert "connection" not in headers
        answer = json.loads(body)
        assert (answer["size"], answer["text"], answer["path"]) == (size, text, "/echo")
    assert json.loads(first[2])["x"] == "a" and json.loads(second[2])["x"] is None


def test_pipelined_requests_in_one_write_are_answered_in_order() -> None:
    both = b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n" + post("/echo", b"after")
    (s1, _, b1), (s2, _, b2) = exchange(both, responses=2)
    assert (s1, json.loads(b1)) == (200, {"waited": True})
    assert (s2, json.loads(b2)["text"]) == (200, "after")


def test_a_request_split_anywhere_across_writes_is_parsed_whole() -> None:
    data = post("/items/abc-123/things", b'{"k": 1}', "X-Thing: split")
    ((status, _, body),) = exchange(*(data[i : i + 7] for i in range(0, len(data), 7)))
    answer = json.loads(body)
    assert status == 200 and answer["params"] == {"item_id": "abc-123"} and answer["x"] == "split"
    assert answer["text"] == '{"k": 1}'


def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent() -> None:
    async def go() -> tuple[bytes, int, bytes]:
        async with serving() as (host, port):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                writer.write(b"hello")
                status, _, body = await read_response(reader)
                return interim, status, body
            finally:
                writer.close()

    interim, status, body = run(go(), timeout=15)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert status == 200 and json.loads(body)["text"] == "hello"


def test_a_chunked_body_is_joined() -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    ((status, _, body),) = exchange(head + b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert status == 200 and json.loads(body)["text"] == "abcdefg"


def test_http_1_0_gets_its_answer_and_the_connection_closes() -> None:
    async def go() -> tuple[int, dict[str, str], bytes, bytes]:
        async with serving() as (host, port):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /echo HTTP/1.0\r\n\r\n")
            status, headers, body = await read_response(reader)
            rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed
            writer.close()
            return status, headers, body, rest

    status, headers, body, rest = run(go(), timeout=15)
    assert status == 200 and headers["connection"] == "close" and json.loads(body)["method"] == "GET"
    assert rest == b""


def test_an_oversize_body_is_read_to_its_end_and_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_BODY_BYTES", 10)
    big, small = exchange(post("/echo", b"x" * 11), post("/echo", b"fits"), responses=2)
    assert big[0] == 200 and json.loads(big[2]) | {"params": {}} == {
        "method": "POST",
        "path": "/echo",
        "params": {},
        "size": 0,
        "oversize": True,
        "x": None,
        "text": "",
    }
    assert json.loads(small[2])["text"] == "fits"  # the connection was still in step


def test_routing_misses_and_errors_are_answered() -> None:
    get = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = exchange(*(get % p for p in (b"/nowhere", b"/items/1/things", b"/refuse", b"/broken")), responses=4)
    (s404, _, _), (s405, h405, _), (s403, _, b403), (s500, _, b500) = answers
    assert (s404, s405, h405["allow"]) == (404, 405, "POST")
    assert (s403, json.loads(b403)) == (403, {"errorMessage": "not now", "errorType": "InvalidStateTransition"})
    assert s500 == 500 and json.loads(b500) == {
        "errorMessage": "RuntimeError('a bug')",
        "errorType": "ServiceException",
    }


def test_a_malformed_request_gets_400_and_the_connection_closes() -> None:
    async def go() -> tuple[int, bytes]:
        async with serving() as (host, port):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"NOT AN HTTP REQUEST\r\n\r\n")
            status, _, _ = await read_response(reader)
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return status, rest

    assert run(go(), timeout=15) == (400, b"")


def test_close_ends_connections_and_cancels_answers_in_progress() -> None:
    gate: asyncio.Future[None]
    entered = asyncio.Event()

    async def forever(request: Request) -> Response:
        entered.set()
        await gate
        return json_response({})

    async def go() -> tuple[bytes, bool, bool]:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        router = Router()
        router.add("GET", "/forever", forever)
        async with open_http_server(router) as server:
            host, port = await server.listen("127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await entered.wait()
        rest = await asyncio.wait_for(reader.read(), 5)  # the block's exit closed the server, with no grace
        writer.close()
        nothing_left = asyncio.all_tasks() == {asyncio.current_task()}
        return rest, not server.tasks and gate.cancelled(), nothing_left

    assert run(go(), timeout=15) == (b"", True, True)


def test_close_with_a_grace_gives_the_answers_in_progress_and_closes_their_connections() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await release.wait()
        return json_response({"given": True})

    async def go() -> tuple[int, dict[str, str], bytes, bytes, bytes]:
        router = Router()
        router.add("GET", "/slow", slow)
        async with open_http_server(router) as server:
            host, port = await server.listen("127.0.0.1", 0)
            busy_reader, busy_writer = await asyncio.open_connection(host, port)
            idle_reader, idle_writer = await asyncio.open_connection(host, port)
            busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await busy_writer.drain()
            await entered.wait()
            async with open_task_group() as group:
                group.create_task(server.close(5))
                idle_rest = await asyncio.wait_for(idle_reader.read(), 5)  # an idle connection is closed at once
                release.set()
                status, headers, body = await read_response(busy_reader)
                busy_rest = await asyncio.wait_for(busy_reader.read(), 5)
        busy_writer.close()
        idle_writer.close()
        return status, headers, body, busy_rest, idle_rest

    status, headers, body, busy_rest, idle_rest = run(go(), timeout=15)
    assert (status, headers["connection"], json.loads(body)) == (200, "close", {"given": True})
    assert busy_rest == idle_rest == b""


class _Transport:
    """Enough of a transport to feed a connection by hand."""

    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)


def test_a_request_arriving_after_close_closes_its_connection_and_starts_nothing() -> None:
    async def go() -> tuple[bool, list[bytes], bool]:
        router = Router()
        router.add("GET", "/echo", echo)
        async with open_http_server(router) as server:
            await server.close()
            transport = _Transport()
            connection = httpserver._Connection(server)
            connection.connection_made(transport)  # type: ignore[arg-type]
            connection.data_received(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            started = bool(server.tasks)
        return transport.closed, transport.written, started

    assert run(go(), timeout=15) == (True, [], False)


# ---- limits on what clients send ------------------------------------------------------------------------------------


async def read_to_end(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bytes]:
    """An answer, then what follows it until the server closes (b"" when it closed right after)."""
    status, headers, body = await read_response(reader)
    return status, headers, body, await asyncio.wait_for(reader.read(), 5)


def refused(*writes: bytes, limits: httpserver.Limits | None = None) -> tuple[int, dict[str, str], Any, bytes]:
    """Send ``writes`` on one connection (stopping when the server has answered); the answer and what followed."""

    async def go() -> tuple[int, dict[str, str], Any, bytes]:
        router = Router()
        router.add("POST", "/echo", echo)
        async with open_http_server(router, limits) as server:
            reader, writer = await asyncio.open_connection(*await server.listen("127.0.0.1", 0))
            try:
                for data in writes:
                    writer.write(data)
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                status, headers, body, rest = await read_to_end(reader)
                return status, headers, json.loads(body), rest
            finally:
                writer.close()

    return run(go(), timeout=15)


def test_a_head_over_the_limit_gets_431_before_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_HEAD_BYTES", 1000)
    # The header never ends: the server answers once 1,000 bytes of head have come.
    status, headers, body, rest = refused(b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000)
    assert (status, headers["connection"], rest) == (431, "close", b"")
    assert body["errorType"] == "RequestEntityTooLarge" and "1000 bytes" in body["errorMessage"]


def test_a_head_within_the_limit_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_HEAD_BYTES", 1000)
    ((status, _, body),) = exchange(post("/echo", b"{}", "X-Thing: " + "a" * 800))
    assert status == 200 and json.loads(body)["x"] == "a" * 800


def test_a_declared_body_over_the_discard_limit_gets_413_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_DISCARD_BYTES", 100)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"  # and no body is ever sent
    status, headers, body, rest = refused(head)
    assert (status, headers["connection"], rest) == (413, "close", b"")
    assert body["errorType"] == "RequestEntityTooLarge"


def test_a_chunked_body_over_the_discard_limit_gets_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_DISCARD_BYTES", 100)
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, body, rest = refused(head + b"40\r\n" + b"x" * 64 + b"\r\n", b"40\r\n" + b"x" * 64 + b"\r\n")
    assert (status, body["errorType"], rest) == (413, "RequestEntityTooLarge", b"")


def test_connections_over_the_cap_get_429_and_a_freed_place_is_taken_again() -> None:
    async def go() -> tuple[int, bytes, int, int]:
        router = Router()
        router.add("POST", "/echo", echo)
        async with open_http_server(router, httpserver.Limits(max_connections=2)) as server:
            address = await server.listen("127.0.0.1", 0)
            first, second = [await asyncio.open_connection(*address) for _ in range(2)]
            for reader, writer in (first, second):  # both held: each answered once, and kept alive
                writer.write(post("/echo", b"{}"))
                assert (await read_response(reader))[0] == 200
            reader, writer = await asyncio.open_connection(*address)
            status, _, body, rest = await read_to_end(reader)
            writer.close()
            first[1].close()
            await asyncio.wait_for(first[0].read(), 5)
            async with asyncio.timeout(5):
                while len(server.connections) > 1:  # noqa: ASYNC110 (the server sees the close at its own pace)
                    await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection(*address)
            writer.write(post("/echo", b"{}"))
            again = (await read_response(reader))[0]
            writer.close()
            second[1].close()
            return status, rest, json.loads(body)["errorType"] == "InvalidRequestFormat", again

    assert run(go(), timeout=15) == (429, b"", True, 200)


def test_a_request_not_sent_whole_in_time_gets_408_and_an_idle_connection_is_closed() -> None:
    async def go() -> tuple[int, bytes, bytes, int]:
        router = Router()
        router.add("POST", "/echo", echo)
        router.add("GET", "/wait", wait)
        limits = httpserver.Limits(request_timeout_s=0.2, idle_timeout_s=0.2)
        async with open_http_server(router, limits) as server:
            address = await server.listen("127.0.0.1", 0)
            slow_reader, slow_writer = await asyncio.open_connection(*address)
            slow_writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")  # 7 bytes short
            idle_reader, idle_writer = await asyncio.open_connection(*address)
            status, _, _, slow_rest = await read_to_end(slow_reader)
            idle_rest = await asyncio.wait_for(idle_reader.read(), 5)
            # A connection whose answer takes longer than the idle limit is not idle: its answer comes.
            busy_reader, busy_writer = await asyncio.open_connection(*address)
            busy_writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            answered = (await read_response(busy_reader))[0]
            for writer in (slow_writer, idle_writer, busy_writer):
                writer.close()
            return status, slow_rest, idle_rest, answered

    assert run(go(), timeout=15) == (408, b"", b"", 200)


def test_a_json_body_nested_too_deeply_is_a_400_not_a_recursion_error() -> None:
    request = Request("POST", "/x", {}, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ApiError) as raised:
        httpserver.read_json(request, ErrorType.INVALID_REQUEST_FORMAT)
    assert raised.value.status == 400 and "nested too deeply" in raised.value.message


def test_a_whole_head_over_the_limit_in_one_piece_gets_431(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_HEAD_BYTES", 1000)
    status, _, body, rest = refused(post("/echo", b"{}", "X-Big: " + "a" * 2000))
    assert (status, body["errorType"], rest) == (431, "RequestEntityTooLarge", b"")


def test_a_graceful_close_answers_requests_sent_before_it_on_connections_not_yet_accepted() -> None:
    """Connections still in the listener's backlog, their requests sent, when the close begins: each is answered."""

    async def go() -> list[int]:
        router = Router()
        router.add("POST", "/echo", echo)
        async with open_http_server(router) as server:
            address = await server.listen("127.0.0.1", 0)
            sockets = []
            for _ in range(5):  # connected and sent by the kernel; the loop has not run to accept them
                client = socket.create_connection(address)
                client.sendall(post("/echo", b"{}"))
                sockets.append(client)
            await server.close(5)
        statuses = []
        for client in sockets:
            client.settimeout(5)
            with client, client.makefile("rb") as answer:
                statuses.append(int(answer.readline().split()[1]))
        return statuses

    assert run(go(), timeout=15) == [200] * 5


def test_a_graceful_close_with_no_connection_open_waits_for_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The moment for requests on their way is for open connections: with none, the close does not wait it."""
    monkeypatch.setattr(httpserver, "DRAIN_S", 3600.0)

    async def go() -> bool:
        async with open_http_server(Router()) as server:
            await server.listen("127.0.0.1", 0)
            await server.close(3600)  # (run's deadline fails the test if the close waits)
            return server.closed

    assert run(go(), timeout=15)


def test_a_head_request_gets_no_body_and_the_connection_stays_in_step() -> None:
    async def go() -> tuple[bytes, int, bytes]:
        async with serving() as (host, port):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n" + post("/echo", b"next"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # (no body may follow it)
                status, _, body = await read_response(reader)
                return head, status, body
            finally:
                writer.close()

    head, status, body = run(go(), timeout=15)
    assert head.startswith(b"HTTP/1.1 405 ") and b"Content-Length: " in head
    assert status == 200 and json.loads(body)["text"] == "next"  # the next answer came right after the head
