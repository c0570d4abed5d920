"""lambdabox's helper processes (posix_spawn, reaped through a pidfd): exit statuses as asyncio gives them, output,
passed descriptors, stdin, a session of its own, no signal after the reaping, and a clear error for a program that is
not there."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from lambdabox.sandbox.helper import spawn_helper
from support import run

PY = sys.executable


def test_exit_statuses_and_a_kill_are_given_as_asyncio_gives_them(tmp_path: Path) -> None:
    async def go() -> tuple[int, int | None, int]:
        with (tmp_path / "out").open("ab") as out:
            exits = spawn_helper([PY, "-c", "raise SystemExit(3)"], output=out.fileno())
            sleeper = spawn_helper([PY, "-c", "import time; time.sleep(600)"], output=out.fileno())
        code = await asyncio.wait_for(exits.wait(), 10)
        before = sleeper.returncode
        sleeper.kill()
        return code, before, await asyncio.wait_for(sleeper.wait(), 10)

    code, before, killed = run(go())
    assert code == 3
    assert before is None and killed == -signal.SIGKILL


def test_output_descriptors_stdin_and_session(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()  # (close-on-exec, as Python makes them)
    probe = (
        "import os, sys\n"
        f"os.write({write_end}, b'passed')\n"
        "print(repr(sys.stdin.read()), os.getsid(0) == os.getpid(), flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
    )

    async def go() -> int:
        with (tmp_path / "out").open("ab") as out:
            helper = spawn_helper([PY, "-c", probe], output=out.fileno(), pass_fds=(write_end,))
        return await asyncio.wait_for(helper.wait(), 10)

    try:
        assert run(go()) == 0
        assert not os.get_inheritable(write_end)  # as it was, once the helper is started
        assert os.read(read_end, 64) == b"passed"
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (tmp_path / "out").read_text().splitlines() == ["'' True", "to stderr"]  # /dev/null; a session leader


def test_no_signal_reaches_a_helper_after_it_was_reaped(tmp_path: Path) -> None:
    async def go() -> int:
        with (tmp_path / "out").open("ab") as out:
            helper = spawn_helper([PY, "-c", "pass"], output=out.fileno())
        code = await asyncio.wait_for(helper.wait(), 10)
        helper.kill()  # (its pid may be another process's by now: nothing is sent)
        helper.terminate()
        return code

    assert run(go()) == 0


def test_a_program_that_is_not_there_is_an_oserror(tmp_path: Path) -> None:
    async def go() -> None:
        with (tmp_path / "out").open("ab") as out:
            spawn_helper(["lambdabox-no-such-program"], output=out.fileno())

    with pytest.raises(FileNotFoundError):
        run(go())
