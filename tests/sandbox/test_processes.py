"""OwnedProcess: output as records, telemetry frames, ending by signal, reaping, failing sinks, no fd leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import psutil
import pytest

from lambdabox.loop import run as run_loop
from lambdabox.sandbox import processes
from lambdabox.sandbox.processes import MAX_RECORD, OwnedProcess

T = TypeVar("T")
PY = sys.executable


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_loop(coro)


class Records:
    """Collects records and lets a test wait (with a deadline) for one matching a predicate."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, label: str, text: str) -> None:
        self.items.append((label, text))
        self._changed.set()

    def texts(self) -> list[str]:
        return [text for _, text in self.items]

    async def wait_for(self, prefix: str, within: float = 10.0) -> str:
        async with asyncio.timeout(within):
            while True:
                for text in self.texts():
                    if text.startswith(prefix):
                        return text
                self._changed.clear()
                await self._changed.wait()


def gone(pid: int) -> bool:
    """Not running any more: vanished, or a zombie left to an init that does not reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, within: float = 5.0) -> None:
    """Poll until ``pid`` is not running any more (a SIGKILLed group dies asynchronously); fail at the deadline."""
    async with asyncio.timeout(within):
        while True:
            if gone(pid):
                return
            await asyncio.sleep(0.005)


async def wait_exit(proc: OwnedProcess, within: float = 5.0) -> int:
    """The returncode, once the process is reaped and its output drained; fail at the deadline."""
    async with asyncio.timeout(within):
        return await proc.wait_exit()


async def start(code: str, records: Records, **kw: Any) -> OwnedProcess:
    return await OwnedProcess.start(
        [PY, "-c", code], env=dict(os.environ), cwd="/", label="fn", on_record=records, **kw
    )


def test_lines_from_both_streams_in_order_last_line_without_newline() -> None:
    code = (
        "import sys\n"
        "for i in range(200):\n"
        "    print(f'out {i}', flush=True)\n"
        "    print(f'err {i}', file=sys.stderr, flush=True)\n"
        "sys.stdout.write('out tail')\n"
    )

    async def body() -> tuple[int, Records]:
        records = Records()
        proc = await start(code, records)
        return await proc.wait_exit(), records

    rc, records = run(body())
    assert rc == 0
    assert {label for label, _ in records.items} == {"fn"}
    outs = [t for t in records.texts() if t.startswith("out")]
    errs = [t for t in records.texts() if t.startswith("err")]
    assert outs == [f"out {i}" for i in range(200)] + ["out tail"]
    assert errs == [f"err {i}" for i in range(200)]


def test_very_long_line_is_split_without_breaking_utf8() -> None:
    line = "é" * (MAX_RECORD // 2 * 3 + 7)  # 2 bytes each: about three records' worth
    code = f"import sys; sys.stdout.write('é' * {len(line)} + '\\nafter\\n')"

    async def body() -> Records:
        records = Records()
        proc = await start(code, records)
        assert await proc.wait_exit() == 0
        return records

    texts = run(body()).texts()
    assert texts[-1] == "after"
    pieces = texts[:-1]
    assert len(pieces) >= 3
    assert all(len(p.encode()) <= MAX_RECORD for p in pieces)
    assert "".join(pieces) == line


def test_multiline_frame_through_telemetry_fd_is_one_record() -> None:
    # awslambdaric's own sink, in a real child, writing to the fd named by _LAMBDA_TELEMETRY_LOG_FD.
    code = (
        "import logging\n"
        "from awslambdaric import bootstrap\n"
        "from awslambdaric.lambda_runtime_log_utils import _JSON_FRAME_TYPES\n"
        "with bootstrap.create_log_sink() as sink:\n"
        "    assert type(sink).__name__ == 'FramedTelemetryLogSink'\n"
        "    sink.log('first line\\nsecond line\\nthird line\\n')\n"
        '    sink.log(\'{"level": "ERROR"}\', frame_type=_JSON_FRAME_TYPES[logging.ERROR])\n'
        "    sink.log_error(['Traceback', '  line 1', 'Boom'])\n"
        "print('plain stdout')\n"
    )

    async def body() -> Records:
        records = Records()
        proc = await start(code, records, telemetry_fd=True)
        assert await proc.wait_exit() == 0
        return records

    texts = run(body()).texts()
    assert "first line\nsecond line\nthird line" in texts
    assert '{"level": "ERROR"}' in texts
    assert "Traceback\n  line 1\nBoom" in texts
    assert "plain stdout" in texts
    assert len(texts) == 4


def test_sigkill_ends_a_child_that_ignores_sigterm() -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('ignored SIGTERM', flush=True))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    time.sleep(60)\n"
    )

    async def body() -> tuple[int | None, int, int]:
        records = Records()
        proc = await start(code, records)
        await records.wait_for("ready")
        proc.signal(signal.SIGTERM)
        await records.wait_for("ignored SIGTERM")  # it got SIGTERM, handled it, and runs on
        alive = proc.returncode
        proc.signal(signal.SIGKILL)
        return alive, await wait_exit(proc), proc.pid

    alive, rc, pid = run(body())
    assert alive is None
    assert rc == -signal.SIGKILL
    assert not psutil.pid_exists(pid)  # reaped, not a zombie


def test_sigterm_ends_a_cooperative_child() -> None:
    async def body() -> int:
        records = Records()
        proc = await start("import time; print('ready', flush=True); time.sleep(60)", records)
        await records.wait_for("ready")
        proc.signal(signal.SIGTERM)
        return await wait_exit(proc)

    assert run(body()) == -signal.SIGTERM


def test_sigkill_to_the_group_ends_the_grandchild_too() -> None:
    code = (
        "import subprocess, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen(['sh', '-c', 'trap \"\" TERM; while :; do sleep 1; done'])\n"
        "print('grandchild', g.pid, flush=True)\n"
        "time.sleep(60)\n"
    )

    async def body() -> tuple[int, int, int]:
        records = Records()
        proc = await start(code, records)
        grandchild = int((await records.wait_for("grandchild")).split()[1])
        assert psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
        proc.signal(signal.SIGKILL)
        rc = await wait_exit(proc)
        await wait_gone(grandchild)
        return rc, proc.pid, grandchild

    rc, pid, grandchild = run(body())
    assert rc == -signal.SIGKILL
    assert not psutil.pid_exists(pid)
    assert gone(grandchild)
    leftovers = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pid and not gone(p.pid)]
    assert leftovers == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_wait_exit_returncodes_and_reaping() -> None:
    async def body() -> tuple[int, int, int]:
        records = Records()
        exits = await start("raise SystemExit(3)", records)
        killed = await start("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", records)
        rc_exit, rc_killed = await exits.wait_exit(), await killed.wait_exit()
        assert exits.returncode == 3
        assert not psutil.pid_exists(exits.pid)
        return rc_exit, rc_killed, killed.pid

    rc_exit, rc_killed, pid = run(body())
    assert (rc_exit, rc_killed) == (3, -signal.SIGKILL)
    assert not psutil.pid_exists(pid)


def test_wait_exit_is_bounded_when_an_escaped_descendant_holds_the_pipes() -> None:
    # The grandchild leaves the group (setsid) and keeps stdout open; exit must not wait for it.
    code = (
        "import subprocess\n"
        "g = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print('escaped', g.pid, flush=True)\n"
    )

    async def body() -> tuple[int, float, int]:
        records = Records()
        proc = await start(code, records)
        escaped = int((await records.wait_for("escaped")).split()[1])
        began = time.monotonic()
        rc = await proc.wait_exit()
        return rc, time.monotonic() - began, escaped

    rc, took, escaped = run(body())
    try:
        assert rc == 0
        assert took < 3
    finally:
        os.kill(escaped, signal.SIGKILL)


def test_signal_after_exit_is_harmless() -> None:
    async def body() -> int:
        proc = await start("pass", Records())
        rc = await proc.wait_exit()
        proc.signal(signal.SIGTERM)
        proc.signal(signal.SIGKILL)
        assert await wait_exit(proc) == rc == proc.returncode  # waiting again changes nothing
        return rc

    assert run(body()) == 0


def test_a_failing_sink_is_told_once_per_stream_and_counted_and_reading_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = (
        "import sys\n"
        "for i in range(3):\n"
        "    print(f'bad {i}', flush=True)\n"
        "print('bad err', file=sys.stderr)\n"
        "print('good')\n"
    )
    taken: list[str] = []

    def sink(_label: str, text: str) -> None:
        if text.startswith("bad"):
            raise ValueError(f"cannot take {text}")
        taken.append(text)

    async def body() -> int:
        proc = await OwnedProcess.start([PY, "-c", code], env=dict(os.environ), cwd="/", label="fn", on_record=sink)
        assert await wait_exit(proc) == 0
        return proc.sink_failures

    failures = run(body())
    assert taken == ["good"]  # the reader outlived the failures
    assert failures == 4
    told = capsys.readouterr().err.splitlines()
    assert sorted(told) == [
        "lambdabox: the log sink of fn failed: ValueError('cannot take bad 0'); later failures are counted",
        "lambdabox: the log sink of fn failed: ValueError('cannot take bad err'); later failures are counted",
    ]


def test_a_start_that_fails_after_the_spawn_kills_reaps_and_closes_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spawned: list[asyncio.subprocess.Process] = []
    real_exec, real_connect = asyncio.create_subprocess_exec, processes._connect

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        spawned.append(await real_exec(*args, **kwargs))
        return spawned[-1]

    async def connect(fd: int, *args: Any) -> Any:
        connected_fds.append(fd)
        if len(connected_fds) == 2:  # stdout is read already; stderr's reader fails
            os.close(fd)  # as the real one closes the pipe it could not connect
            raise RuntimeError("no reader")
        return await real_connect(fd, *args)

    connected_fds: list[int] = []
    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    monkeypatch.setattr(processes, "_connect", connect)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"

    async def body() -> None:
        with pytest.raises(RuntimeError, match="no reader"):
            await start(code, Records(), telemetry_fd=True)

    before = sorted(os.listdir("/proc/self/fd"))
    run(body())
    assert sorted(os.listdir("/proc/self/fd")) == before  # every pipe end closed, the read ones too
    assert len(spawned) == 1 and spawned[0].returncode == -signal.SIGKILL  # killed and reaped
    assert not psutil.pid_exists(spawned[0].pid)


def test_no_fd_leak() -> None:
    async def body() -> None:
        records = Records()
        for _ in range(3):
            proc = await start("print('x')", records, telemetry_fd=True)
            await proc.wait_exit()
            proc = await start("import time; print('ready', flush=True); time.sleep(60)", records)
            await records.wait_for("ready")
            proc.signal(signal.SIGKILL)
            await wait_exit(proc)
        try:
            await OwnedProcess.start(
                ["/nonexistent/binary"], env={}, cwd="/", label="x", on_record=records, telemetry_fd=True
            )
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("start of a missing binary should fail")

    before = sorted(os.listdir("/proc/self/fd"))
    run(body())
    assert sorted(os.listdir("/proc/self/fd")) == before
