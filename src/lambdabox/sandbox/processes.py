"""Owns every child process lambdabox starts: its own process group, its output captured as log
records (lines of stdout/stderr, frames of awslambdaric's telemetry fd), and its reaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal as signals
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, cast

from lambdabox.core.errors import SandboxError
from lambdabox.loop import read_pipe

LogSink = Callable[[str, str], None]
"""``(source label, one log record's text)``."""


class Child(Protocol):
    """A started process as its starter sees it (an asyncio subprocess, or one an environment's holder started)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


Spawn = Callable[[Sequence[str], Mapping[str, str], int, int, "int | None"], Awaitable[Child]]
"""``(argv, env, stdout, stderr, telemetry write end or None) -> the started process``: where and how to start it
(its own session; with a telemetry pipe, _LAMBDA_TELEMETRY_LOG_FD set to where the child has it)."""

MAX_RECORD = 256 * 1024
"""Longer lines (and frame payloads) are handed on in pieces of at most this many bytes."""
KILL_BOUND_S = 5.0
"""How long to wait for the process to die after SIGKILL before giving up on it."""
DRAIN_BOUND_S = 1.0
"""How long to wait, after exit, for pipes still held open by escaped descendants."""
TELEMETRY_FD_ENV = "_LAMBDA_TELEMETRY_LOG_FD"

# awslambdaric's FramedTelemetryLogSink: frame type (0xa55a00XX: bit 0 text/JSON, the next bits the
# log level), payload length, timestamp in microseconds, all big-endian; then the UTF-8 payload.
_FRAME_HEADER = struct.Struct(">IIQ")
_FRAME_MAGIC_MASK = 0xFFFF0000
_FRAME_MAGIC = 0xA55A0000


def _cut(data: bytes | bytearray, limit: int) -> int:
    """An index <= limit that does not split a UTF-8 sequence (unless the data is not UTF-8)."""
    for cut in range(limit, max(limit - 4, 0), -1):
        if data[cut] & 0xC0 != 0x80:  # data[cut] starts the next piece: not a continuation byte
            return cut
    return limit


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", errors="replace")


class _Capture(asyncio.Protocol):
    """Reads one pipe and hands each record to the sink; ``done`` resolves when the pipe closes."""

    def __init__(self, label: str, sink: LogSink, framed: bool) -> None:
        self._label = label
        self._sink = sink
        self._framed = framed
        self._buf = bytearray()
        self._frame_left = -1  # payload bytes still due for the current frame; -1 = expecting a header
        self.sink_failures = 0  # records the sink raised on
        self.transport: asyncio.ReadTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.ReadTransport, transport)  # a read pipe's (uvloop's is no subclass)

    def _emit(self, data: bytes | bytearray) -> None:
        text = _text(data)
        if text.endswith("\n"):
            text = text[:-1]
        try:
            self._sink(self._label, text)
        except Exception as e:  # a failing sink must not kill the reader: the first failure is told, all counted
            self.sink_failures += 1
            if self.sink_failures == 1:
                with contextlib.suppress(OSError, ValueError):  # nor a closed stderr
                    print(
                        f"lambdabox: the log sink of {self._label} failed: {e!r}; later failures are counted",
                        file=sys.stderr,
                    )

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._framed:
            self._frames()
        else:
            self._lines()

    def _lines(self) -> None:
        buf = self._buf
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0 or nl - start > MAX_RECORD:
                if len(buf) - start <= MAX_RECORD:
                    break
                end = start + _cut(buf[start:], MAX_RECORD)
                self._emit(buf[start:end])
                start = end
                continue
            self._emit(buf[start:nl])
            start = nl + 1
        del buf[:start]

    def _frames(self) -> None:
        buf = self._buf
        while True:
            if self._frame_left < 0:
                if len(buf) < _FRAME_HEADER.size:
                    return
                kind, length, _micros = _FRAME_HEADER.unpack_from(buf)
                if kind & _FRAME_MAGIC_MASK != _FRAME_MAGIC:
                    self._framed = False  # not awslambdaric framing: keep the bytes as plain lines
                    self._lines()
                    return
                del buf[: _FRAME_HEADER.size]
                self._frame_left = length
            if len(buf) >= self._frame_left:
                self._emit(buf[: self._frame_left])
                del buf[: self._frame_left]
                self._frame_left = -1
            elif len(buf) > MAX_RECORD:
                cut = _cut(buf, MAX_RECORD)
                self._emit(buf[:cut])
                del buf[:cut]
                self._frame_left -= cut
            else:
                return

    def eof_received(self) -> bool | None:
        self._flush()
        return None

    def _flush(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        if not self.done.done():
            self.done.set_result(None)


async def _connect(fd: int, label: str, sink: LogSink, framed: bool) -> _Capture:
    loop = asyncio.get_running_loop()
    pipe = read_pipe(fd)
    try:
        _, protocol = await loop.connect_read_pipe(lambda: _Capture(label, sink, framed), pipe)
    except BaseException:
        pipe.close()
        raise
    return protocol


async def spawn_here(
    argv: Sequence[str], env: Mapping[str, str], stdout: int, stderr: int, telemetry: int | None, *, cwd: str
) -> Child:
    """A child of this process in its own session, in ``cwd``."""
    env = dict(env) if telemetry is None else {**env, TELEMETRY_FD_ENV: str(telemetry)}
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        pass_fds=() if telemetry is None else (telemetry,),
    )


class OwnedProcess:
    """A child in its own process group whose output becomes records and which is always reaped."""

    def __init__(self, proc: Child, label: str, captures: list[_Capture]) -> None:
        self.label = label
        self.pid: int = proc.pid
        self._proc = proc
        self._captures = captures

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        label: str,
        on_record: LogSink,
        telemetry_fd: bool = False,
        spawn: Spawn | None = None,
    ) -> OwnedProcess:
        """Spawn ``argv`` (no shell) with stdin on /dev/null; stdout/stderr lines go to ``on_record``.

        ``telemetry_fd`` also hands the child the write end of awslambdaric's framed log pipe
        (``_LAMBDA_TELEMETRY_LOG_FD``); each frame becomes one record. ``spawn`` starts it (default: a child of
        this process, in ``cwd``).
        """
        spawn = spawn or functools.partial(spawn_here, cwd=cwd)
        # The pipes are ours (not asyncio's) so that exit does not wait for descendants holding them.
        fds: list[int] = []  # every fd still open in this process, closed on any failure
        try:
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            fds += [err_r, err_w]
            pass_fds: tuple[int, ...] = ()
            tel_r = -1
            if telemetry_fd:
                tel_r, tel_w = os.pipe()
                fds += [tel_r, tel_w]
                pass_fds = (tel_w,)
            proc = await spawn(argv, env, out_w, err_w, pass_fds[0] if pass_fds else None)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in (out_w, err_w, *pass_fds):
            fds.remove(fd)
            os.close(fd)
        captures: list[_Capture] = []
        try:
            for fd, framed in ((out_r, False), (err_r, False), (tel_r, True)):
                if fd < 0:
                    continue
                fds.remove(fd)
                captures.append(await _connect(fd, label, on_record, framed))
        except BaseException:
            for fd in fds:
                os.close(fd)
            await cls(proc, label, captures)._kill()
            raise
        return cls(proc, label, captures)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def sink_failures(self) -> int:
        """How many of the process's records the sink raised on (the first per stream is told on stderr)."""
        return sum(capture.sink_failures for capture in self._captures)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group; nothing happens if it is already gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def wait_exit(self) -> int:
        """Wait for the exit, then drain the output. No deadline: bound it yourself (to end the process, send
        SIGKILL to its group with ``signal`` first)."""
        returncode = await self._proc.wait()
        await self._drain()
        return returncode

    async def _kill(self) -> None:
        """SIGKILL the group, reap the leader and drain, within KILL_BOUND_S (a ``start`` that failed)."""
        self.signal(signals.SIGKILL)
        try:
            await asyncio.wait_for(self._proc.wait(), KILL_BOUND_S)
        except TimeoutError:
            raise SandboxError(f"{self.label} (pid {self.pid}) still alive {KILL_BOUND_S}s after SIGKILL") from None
        finally:
            await self._drain()

    async def _drain(self) -> None:
        """Let the readers finish the pipes (bounded), then close whatever is still open."""
        pending = [c.done for c in self._captures if not c.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_BOUND_S)
        for capture in self._captures:
            if capture.transport is not None and not capture.transport.is_closing():
                capture.transport.close()
        pending = [c.done for c in self._captures if not c.done.done()]
        if pending:  # close() calls connection_lost on the next loop iteration
            await asyncio.wait(pending, timeout=DRAIN_BOUND_S)
