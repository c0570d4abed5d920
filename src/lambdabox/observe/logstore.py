"""Local CloudWatch Logs: every environment's log lines kept on disk as Lambda's log group and stream, and read back.

``<root>/<group>/<stream>.jsonl``, both names percent-encoded (see :func:`encode_name`); one JSON object per log
event, ``{"timestamp": ms, "message": text, "ingestionTime": ms}``, as ``aws logs get-log-events`` shows them.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import string
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from lambdabox.core.model import FunctionConfig
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import Observer, TelemetryEvent
from lambdabox.environment.runner import Environment
from lambdabox.observe.console import format_event

ENV_VAR = "LAMBDABOX_LOG_DIR"
DEFAULT_ROOT = Path(".lambdabox") / "logs"
SUFFIX = ".jsonl"
WRITE_BUFFER_BYTES = 64 * 1024  # per environment: written out when full, at each REPORT and at close
READ_CHUNK_BYTES = 16 * 1024  # per stream being read
MAX_NAME_BYTES = 250  # an encoded name and its suffix must fit in a file name (255 bytes on Linux)
_SAFE = frozenset(string.ascii_letters + string.digits + "-_")


def group_name(function_name: str) -> str:
    """The log group Lambda writes a function's logs to."""
    return f"/aws/lambda/{function_name}"


def encode_name(name: str) -> str:
    """A file name for a group or stream name: every byte other than ``A-Za-z0-9-_`` as ``%XX`` (so ``/``, ``[``,
    ``$`` and ``.`` never reach the file system), reversed exactly by :func:`decode_name`."""
    encoded = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    if not name or len(encoded) + len(SUFFIX) > MAX_NAME_BYTES:
        raise ValueError(f"cannot keep logs under the name {name!r}: empty, or too long for a file name")
    return encoded


def decode_name(encoded: str) -> str:
    data = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%":
            data.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            data += encoded[i].encode()
            i += 1
    return data.decode()


def default_root() -> Path:
    """``$LAMBDABOX_LOG_DIR`` if set, else ``.lambdabox/logs`` under the current directory."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT).absolute()


@dataclass(frozen=True)
class LogEvent:
    stream: str
    timestamp: int  # epoch milliseconds, when the line was produced
    message: str
    ingestion_time: int  # epoch milliseconds, when it was stored


class LogStore:
    """Log groups (directories) of log streams (files) under ``root``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).absolute() if root else default_root()

    def path(self, group: str, stream: str) -> Path:
        return self.root / encode_name(group) / (encode_name(stream) + SUFFIX)

    def groups(self) -> list[str]:
        """Every group with a directory under the root, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(decode_name(p.name) for p in self.root.iterdir() if p.is_dir() and _decodable(p.name))

    def streams(self, group: str) -> list[str]:
        """The group's streams, the most recently written last."""
        try:
            directory = self.root / encode_name(group)
        except ValueError:  # a name no stream can have been kept under
            return []
        if not directory.is_dir():
            return []
        found = []
        for p in directory.iterdir():
            if p.name.endswith(SUFFIX) and _decodable(p.name[: -len(SUFFIX)]):
                with contextlib.suppress(FileNotFoundError):
                    found.append((p.stat().st_mtime_ns, decode_name(p.name[: -len(SUFFIX)])))
        return [name for _, name in sorted(found)]

    def recorder(self, function_name: str) -> StreamRecorder:
        """An observer for one environment of this function; :meth:`StreamRecorder.attach` names its stream."""
        return StreamRecorder(self, group_name(function_name))

    def read(self, group: str, stream: str, offset: int = 0) -> tuple[list[LogEvent], int]:
        """The complete events stored after byte ``offset`` (at most about READ_CHUNK_BYTES of them), and the offset
        after the last one; a line still being written is left for the next read."""
        try:
            with self.path(group, stream).open("rb") as file:
                file.seek(offset)
                data = file.read(READ_CHUNK_BYTES)
                while data and b"\n" not in data:  # one event longer than a chunk
                    more = file.read(READ_CHUNK_BYTES)
                    if not more:
                        break
                    data += more
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]
        return [e for line in complete.splitlines() if (e := _parse(stream, line)) is not None], offset + len(complete)

    def events(self, group: str) -> Iterator[LogEvent]:
        """Every event of the group, the streams merged in time order; memory and open files stay bounded."""
        return heapq.merge(*(self._stream_events(group, s) for s in self.streams(group)), key=_by_time)

    def _stream_events(self, group: str, stream: str) -> Iterator[LogEvent]:
        offset = 0
        while True:
            events, offset = self.read(group, stream, offset)
            if not events:
                return
            yield from events


def _by_time(event: LogEvent) -> int:
    return event.timestamp


def _decodable(encoded: str) -> bool:
    try:
        return encode_name(decode_name(encoded)) == encoded
    except ValueError:  # also UnicodeDecodeError
        return False


def _parse(stream: str, line: bytes) -> LogEvent | None:
    try:
        item = json.loads(line)
        return LogEvent(stream, int(item["timestamp"]), str(item["message"]), int(item.get("ingestionTime", 0)))
    except (ValueError, TypeError, KeyError):  # a line torn by a crash: skipped
        return None


class StreamRecorder:
    """An observer that appends one environment's log lines (Lambda's own, the function's, the extensions') to its
    stream, as CloudWatch stores them: END and REPORT are two events, a multi-line record is one event.

    A record costs a format and a JSON escape; the file is written when WRITE_BUFFER_BYTES are buffered, after each
    REPORT, and at close (``ingestionTime`` is when). Until :meth:`attach` names the stream, as much is kept."""

    def __init__(self, store: LogStore, group: str) -> None:
        self.store = store
        self.group = group
        self.stream: str | None = None
        self.dropped = 0  # records that could not be stored (write errors, records after close, a full buffer)
        self._buffer: list[tuple[int, str]] = []  # (timestamp, message as a JSON string)
        self._buffered = 0
        self._file: BinaryIO | None = None
        self._closed = False

    def attach(self, stream: str) -> None:
        """Name the stream (the environment's ``log_stream``) and write what came before."""
        self.stream = stream
        self.flush()

    def __call__(self, event: TelemetryEvent) -> None:
        line = format_event(event)
        if line is None:
            return
        timestamp = int(event.time * 1000)
        if event.type != "platform.report":
            self._add(timestamp, line)
            return
        for part in line.split("\n"):
            self._add(timestamp, part)
        self.flush()

    def _add(self, timestamp: int, message: str) -> None:
        if self._closed or (self.stream is None and self._buffered > WRITE_BUFFER_BYTES):
            self.dropped += 1
            return
        self._buffer.append((timestamp, json.dumps(message)))
        self._buffered += len(message)
        if self._buffered > WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Append what is buffered to the stream's file (nothing before the stream is named)."""
        if self.stream is None or not self._buffer:
            return
        now = int(time.time() * 1000)
        data = "".join(
            f'{{"timestamp":{t},"message":{m},"ingestionTime":{max(t, now)}}}\n' for t, m in self._buffer
        ).encode()
        count = len(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        try:
            if self._file is None:
                path = self.store.path(self.group, self.stream)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("ab", buffering=0)
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                if not written:
                    raise OSError(f"{self._file.name}: nothing written")
                view = view[written:]
        except OSError as error:
            self.dropped += count
            if not self._closed:
                print(f"lambdabox: cannot keep logs in {self.store.root}: {error}", file=sys.stderr, flush=True)
            self.close()

    def close(self) -> None:
        """Write out what is buffered and close the file; later records are counted in ``dropped``."""
        if not self._closed:
            self.flush()
        self._closed = True
        self.dropped += len(self._buffer)
        self._buffer.clear()
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __enter__(self) -> StreamRecorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


@contextlib.asynccontextmanager
async def open_logged_environment(
    config: FunctionConfig,
    options: Options | None = None,
    observers: Iterable[Observer] = (),
    store: LogStore | None = None,
    *,
    on_reset: Callable[[], None] | None = None,
) -> AsyncIterator[Environment]:
    """:func:`open_environment`, with every log line of the environment, shutdown included, kept in ``store``
    (none: nowhere) under ``/aws/lambda/<function name>`` and the environment's ``log_stream``."""
    if store is None:
        async with open_environment(config, options, observers, on_reset=on_reset) as env:
            yield env
        return
    with store.recorder(config.function_name) as recorder:
        async with open_environment(config, options, [*observers, recorder], on_reset=on_reset) as env:
            recorder.attach(env.log_stream)
            yield env
