"""Cgroups through real processes, on whichever hierarchy the host has: the memory limit and its OOM kills, peak
memory, freeze and thaw, killing a whole tree, Lambda's process limit, and removal; and without root, as an
unprivileged user (tests/rootless_support.py), the cgroup delegated to it on cgroup v2 and what is said where none
can be had. Marked ``cgroup2``: on a cgroup v1 host ``./dev test`` also runs them in a cgroup v2 VM
(scripts/cgroup2-vm.sh)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lambdabox.loop import run as run_loop
from lambdabox.sandbox import cgroups as cgroups_module
from lambdabox.sandbox import leftovers
from lambdabox.sandbox.cgroups import DELEGATE_HINT, PIDS_MAX, SUPERVISOR, Cgroups, make_cgroups
from rootless_support import REPO, delegate, delegated_cgroup_v2, rootless_user, run_as_user
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


def test_the_cgroups_of_a_lambdabox_that_is_gone_are_removed_with_their_frozen_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = leftovers.owner(child.pid)
    child.wait(timeout=30)
    monkeypatch.setattr(leftovers, "_asked", set())

    async def body() -> tuple[list[str], list[str], int | None, bool]:
        with monkeypatch.context() as patch:
            patch.setattr(leftovers, "owner", lambda pid=None: gone)
            orphan = await made("Orphan")
        mine = await made("Mine")
        try:
            process = await start(orphan, "import time\nprint('up', flush=True)\ntime.sleep(600)")
            assert process.stdout is not None
            await process.stdout.readline()
            orphan.freeze(True)
            await poll_until(orphan.frozen)
            orphan.close()  # as a lambdabox that died leaves it: nothing of it open
            said = await cgroups_module.remove_left_behind()
            async with asyncio.timeout(30):
                returncode = await process.wait()
            again = await cgroups_module.remove_left_behind()  # once per process
            return said, again, returncode, all(path.exists() for path in mine.paths())
        finally:
            await removed(mine)

    said, again, returncode, mine_kept = run(body())
    parents = {"v1": ["freezer", "memory"], "v2": [cgroups_module.V2_PARENT]}[HIERARCHY or ""]
    assert said == [
        f"removed a cgroup in {cgroups_module.CGROUP_ROOT / parent} left by lambdabox processes that are gone"
        for parent in parents
    ]
    assert again == [] and returncode == -signal.SIGKILL and mine_kept
    assert not [p for parent in parents for p in (cgroups_module.CGROUP_ROOT / parent).iterdir() if gone in p.name]


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


def test_what_the_host_lacks_is_said_to_who_is_not_root(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: 1000)
        nothing = make_cgroups("x", 128, root=tmp_path)
        (tmp_path / "memory").mkdir()
        v1 = make_cgroups("x", 128, root=tmp_path)
    assert nothing == (None, f"not root, and there is no cgroup v2 at {tmp_path} to be delegated")
    assert v1 == (None, "not root, and cgroup v1 cannot be delegated (its cgroups are made as root)")


def test_a_cgroup_v2_without_the_memory_controller_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    cgroups, why = cgroups_module.make_cgroups("x", 128, root=tmp_path)
    assert cgroups is None and why == f"cgroup v2 at {tmp_path} has no memory controller"


# Without root: the scripts below run as the unprivileged user of tests/rootless_support.py, with this repository's
# lambdabox, and print what they found as one JSON line.
USER_PRELUDE = f"""
import asyncio, json, os, subprocess, sys
sys.path.insert(0, {str(REPO / "src")!r})
from lambdabox.sandbox.cgroups import CgroupsV2, make_cgroups
"""

MAKE_AND_SAY = (
    USER_PRELUDE
    + """
cgroups, why = make_cgroups("t", 64)
print(json.dumps({"made": cgroups is not None, "why": why, "own": open("/proc/self/cgroup").read()}))
"""
)

# Another lambdabox, started from the first one (in the supervisor): the parent of the environment's cgroup it gets.
LATER = (
    USER_PRELUDE
    + """
cgroups, why = make_cgroups("later", 64)
assert cgroups is not None, why
print(json.dumps(str(cgroups.path.parent)))
cgroups.close()
assert asyncio.run(cgroups.remove()) == []
"""
)

# Two environments' cgroups; a child spawned into the first allocates 200 MB past its 64 MB; a later lambdabox
# (LATER, the script's argument) started from the supervisor finds the same delegated cgroup; both removed.
DELEGATED_ENVIRONMENTS = (
    USER_PRELUDE
    + """
def lines(path):
    return path.read_text().split() if path.exists() else None

first, why = make_cgroups("t", 64)
second, why_second = make_cgroups("t", 64)
assert isinstance(first, CgroupsV2) and isinstance(second, CgroupsV2), (why, why_second)
path = first.path
supervisor = path.parent / "lambdabox-supervisor"
report = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "path": str(path),
    "second": str(second.path),
    "owner": path.stat().st_uid,
    "own": open("/proc/self/cgroup").read().strip(),
    "supervisor": [int(pid) for pid in lines(supervisor / "cgroup.procs")],
    "parent_procs": lines(path.parent / "cgroup.procs"),
    "subtree_control": lines(path.parent / "cgroup.subtree_control"),
    "limits": {name: lines(path / name) for name in ("memory.max", "memory.swap.max", "pids.max")},
}
before = first.oom_kill_count()
grow = "b = b'x' * (200 * 1024 * 1024)\\nprint('survived', flush=True)"
join = f'echo $$ > {path / "cgroup.procs"} && exec "$@"'
child = subprocess.run(["/bin/sh", "-c", join, "sh", sys.executable, "-c", grow], capture_output=True, text=True)
report.update(returncode=child.returncode, stdout=child.stdout, kills=first.oom_kill_count() - before)
later = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
report["later"] = json.loads(later.stdout) if later.returncode == 0 else later.stderr
problems = []
for cgroups in (first, second):
    cgroups.close()
    problems += asyncio.run(cgroups.remove())
report.update(problems=problems, left=[p.exists() for p in (path, second.path)], supervisor_left=supervisor.exists())
print(json.dumps(report))
"""
)


def as_user(code: str, *args: str, cgroup: Path | None = None, under_a_shell: bool = False) -> dict[str, Any]:
    """``code`` run by this interpreter as the unprivileged user (in ``cgroup`` if given; as the child of a shell
    that waits for it if ``under_a_shell``): its JSON line."""
    argv = [sys.executable, "-c", code, *args]
    if under_a_shell:
        argv = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *argv]
    done = run_as_user(argv, env={"PYTHONDONTWRITEBYTECODE": "1"}, timeout=300, cgroup=cgroup)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


@pytest.mark.skipif(HIERARCHY != "v1", reason="what a user is told on a cgroup v1 host")
def test_without_root_cgroup_v1_is_said_not_to_be_delegable() -> None:
    report = as_user(MAKE_AND_SAY)
    assert report["made"] is False
    assert report["why"] == "not root, and cgroup v1 cannot be delegated (its cgroups are made as root)"


@pytest.mark.skipif(HIERARCHY != "v2", reason="a cgroup is delegated to a user on cgroup v2 only")
def test_without_root_the_delegated_cgroup_holds_the_environments_with_their_limits() -> None:
    uid, gid, _ = rootless_user()
    with delegated_cgroup_v2(uid, gid) as delegated:
        report = as_user(DELEGATED_ENVIRONMENTS, LATER, cgroup=delegated, under_a_shell=True)
        supervisor = delegated / SUPERVISOR
        still = (supervisor.is_dir(), (delegated / "cgroup.procs").read_text().split())
    path, second = Path(report["path"]), Path(report["second"])
    assert path.parent == second.parent == delegated and path != second
    assert report["owner"] == uid  # made by the user, not root
    assert report["own"] == f"0::/{delegated.name}/{SUPERVISOR}"
    assert {report["pid"], report["ppid"]} <= set(report["supervisor"])  # lambdabox and the shell it runs under
    assert report["parent_procs"] == []  # no process left where controllers are enabled for the children
    assert {"memory", "pids"} <= set(report["subtree_control"])
    assert report["limits"]["memory.max"] == [str(64 * MIB)]
    assert report["limits"]["memory.swap.max"] in (["0"], None)  # None: swap accounting off
    assert report["limits"]["pids.max"] == [str(PIDS_MAX)]
    assert report["returncode"] == -signal.SIGKILL and report["stdout"] == ""  # 200 MB past 64 MB: OOM-killed
    assert report["kills"] >= 1
    assert report["later"] == str(delegated)  # a lambdabox started from the supervisor finds the same one
    assert report["problems"] == [] and report["left"] == [False, False]
    assert report["supervisor_left"] is True and still == (True, [])


@pytest.mark.skipif(HIERARCHY != "v2", reason="a cgroup is delegated to a user on cgroup v2 only")
def test_without_root_a_cgroup_not_delegated_is_said_with_what_is_not_writable() -> None:
    uid, gid, _ = rootless_user()
    with delegated_cgroup_v2(uid, gid) as delegated:
        (plain := delegated / "plain").mkdir()  # root's, not handed over
        (half := delegated / "half").mkdir()
        os.chown(half, uid, gid)  # the directory only
        reports = [as_user(MAKE_AND_SAY, cgroup=cgroup) for cgroup in (plain, half)]
    for report, cgroup, unwritable in (
        (reports[0], plain, "the directory, cgroup.procs, cgroup.subtree_control"),
        (reports[1], half, "cgroup.procs, cgroup.subtree_control"),
    ):
        shown = f"/{delegated.name}/{cgroup.name}"
        assert report["own"].strip() == f"0::{shown}"
        assert report["made"] is False
        assert report["why"] == (
            f"not root, and the cgroup {shown} lambdabox runs in is not delegated to uid {uid}: "
            f"{unwritable} not writable ({DELEGATE_HINT})"
        )


@pytest.mark.skipif(HIERARCHY != "v2", reason="a cgroup is delegated to a user on cgroup v2 only")
def test_without_root_a_delegated_cgroup_without_the_memory_controller_is_refused() -> None:
    uid, gid, _ = rootless_user()
    with delegated_cgroup_v2(uid, gid) as delegated:
        (delegated / "cgroup.subtree_control").write_text("+pids")  # memory not given to its children
        (nomem := delegated / "nomem").mkdir()
        delegate(nomem, uid, gid)
        report = as_user(MAKE_AND_SAY, cgroup=nomem)
        made_nothing = [entry.name for entry in nomem.iterdir() if entry.is_dir()]
    assert report["made"] is False
    assert report["why"] == (
        f"not root, and the cgroup /{delegated.name}/nomem delegated to uid {uid} lacks the memory controller "
        "(not enabled in its parent's cgroup.subtree_control)"
    )
    assert made_nothing == []  # refused before the supervisor is made
