"""Cgroups through real processes, on whichever hierarchy the host has: the memory limit and its OOM kills, peak
memory, freeze and thaw, killing a whole tree, Lambda's process limit, and removal. Marked ``cgroup2``: on a cgroup v1
host ``./dev test`` also runs them in a cgroup v2 VM (scripts/cgroup2-vm.sh)."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lambdabox.loop import run as run_loop
from lambdabox.sandbox import cgroups as cgroups_module
from lambdabox.sandbox.cgroups import PIDS_MAX, Cgroups, make_cgroups
from support import host_cgroups

T = TypeVar("T")
HIERARCHY = host_cgroups()
pytestmark = [
    pytest.mark.cgroup2,
    pytest.mark.skipif(HIERARCHY is None, reason="needs root and cgroups (v2, or v1 memory and freezer)"),
]
MIB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(120):
            return await coro

    return run_loop(bounded())


async def start(cgroups: Cgroups, code: str) -> asyncio.subprocess.Process:
    """This interpreter running ``code``, inside the cgroups from its first instruction."""
    joins = " && ".join(f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in cgroups.paths())
    return await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", f'{joins} && exec "$@"', "sh", sys.executable, "-c", code,
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def made(name: str, memory_mb: int = 128) -> Cgroups:
    cgroups, why = make_cgroups(name, memory_mb)
    assert cgroups is not None, why
    assert cgroups.hierarchy == HIERARCHY
    return cgroups


async def removed(cgroups: Cgroups) -> None:
    await cgroups.kill_all()
    cgroups.close()
    assert await cgroups.remove() == []
    assert not any(path.exists() for path in cgroups.paths())


def test_the_memory_limit_kills_and_is_counted_and_the_peak_is_kept() -> None:
    async def body() -> tuple[int, int, int]:
        cgroups = await made("oom", memory_mb=64)
        try:
            before = cgroups.oom_kill_count()
            grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 1024 * 1024))"
            process = await start(cgroups, grow)
            async with asyncio.timeout(60):
                returncode = await process.wait()
            return returncode, cgroups.oom_kill_count() - before, cgroups.peak_memory_bytes()
        finally:
            await removed(cgroups)

    returncode, kills, peak = run(body())
    assert returncode == -signal.SIGKILL
    assert kills == 1
    assert 48 * MIB < peak <= 64 * MIB + 4 * MIB  # it grew to the limit, not past it


def test_freeze_stops_every_process_and_thaw_resumes_them() -> None:
    async def body() -> tuple[int, int, int]:
        cgroups = await made("freeze")
        try:
            tick = "import sys, time\nwhile True:\n    print('t', flush=True)\n    time.sleep(0.01)"
            process = await start(cgroups, tick)
            assert process.stdout is not None
            await process.stdout.readline()
            cgroups.freeze(True)
            await frozen_for_sure(process)
            during = await count_lines(process, 0.3)
            cgroups.freeze(False)
            after = await count_lines(process, 0.3)
            return during, after, len(cgroups.pids())
        finally:
            await removed(cgroups)

    during, after, pids = run(body())
    assert during == 0 and after > 5
    assert pids == 1


async def poll_until(check: Any, within: float = 30.0) -> None:
    """Bounded poll: re-check every few ms until true, fail at the deadline."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.005)


async def frozen_for_sure(process: asyncio.subprocess.Process) -> None:
    """Drain what was printed before the freeze took hold (the kernel completes a freeze on its own)."""
    assert process.stdout is not None
    while True:
        try:
            async with asyncio.timeout(0.2):
                await process.stdout.readline()
        except TimeoutError:
            return


async def count_lines(process: asyncio.subprocess.Process, seconds: float) -> int:
    assert process.stdout is not None
    count = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            async with asyncio.timeout(left):
                await process.stdout.readline()
            count += 1
        except TimeoutError:
            break
    return count


def test_kill_all_ends_a_tree_that_keeps_forking() -> None:
    async def body() -> tuple[int, set[int]]:
        cgroups = await made("tree")
        try:
            spawner = (
                "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(600)\n    time.sleep(0.005)"
            )
            process = await start(cgroups, spawner)
            await poll_until(lambda: len(cgroups.pids()) >= 5)
            await cgroups.kill_all()
            async with asyncio.timeout(30):
                returncode = await process.wait()
            return returncode, cgroups.pids()
        finally:
            await removed(cgroups)

    returncode, left = run(body())
    assert returncode == -signal.SIGKILL
    assert left == set()


@pytest.mark.skipif(HIERARCHY != "v2", reason="the pids controller is used on cgroup v2")
def test_an_environment_has_lambdas_limit_of_1024_processes_and_threads() -> None:
    async def body() -> tuple[int, bytes]:
        cgroups = await made("pids")
        try:
            threads = (
                "import threading, time\nstarted = 1\ntry:\n    for _ in range(2000):\n"
                "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n        started += 1\n"
                "except RuntimeError:\n    pass\nprint(started, flush=True)\nimport os\nos._exit(0)"
            )
            process = await start(cgroups, threads)
            async with asyncio.timeout(90):
                out, _ = await process.communicate()
            return process.returncode or 0, out
        finally:
            await removed(cgroups)

    returncode, out = run(body())
    assert returncode == 0
    assert int(out) == PIDS_MAX  # the main thread and 1023 more, then "can't start new thread"


def test_what_the_host_lacks_is_said() -> None:
    if os.geteuid() == 0:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "geteuid", lambda: 1000)
            assert make_cgroups("x", 128) == (None, "not root (the cgroups an environment needs are made as root)")


def test_a_cgroup_v2_without_the_memory_controller_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    cgroups, why = cgroups_module.make_cgroups("x", 128, root=tmp_path)
    assert cgroups is None and why == f"cgroup v2 at {tmp_path} has no memory controller"
