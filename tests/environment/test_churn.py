"""Environments made and torn down concurrently, many in a row (the churn that once raced in how namespaces were
entered): every invoke succeeds, and no process, holder, cgroup, work dir or descriptor is left."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

from lambdabox.core.model import Response
from lambdabox.environment.opening import open_environment
from lambdabox.sandbox.leftovers import owner
from support import make_function, run

ENVIRONMENTS = 120
AT_ONCE = 6
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the leak checks read every process's namespaces")


def lambdabox_children() -> set[int]:
    """Live (not zombie) descendants of this process, from the kernel's children lists."""
    found: set[int] = set()
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    children = [int(child) for child in f.read().split()]
            except OSError:
                continue
            found.update(children)
            todo.extend(children)
    return {pid for pid in found if _state(pid) not in ("Z", None)}


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def leftovers() -> list[str]:
    """The churned function's work dirs and cgroups that exist now."""
    found = [str(p) for p in Path(tempfile.gettempdir()).glob(f"lambdabox-{owner()}-Churn-*")]
    for root in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup/lambdabox")):
        found += [str(p) for p in root.glob("*Churn-*")]
    return found


@needs_root
def test_environments_made_and_torn_down_concurrently_all_work_and_leave_nothing(tmp_path: Path) -> None:
    config = dataclasses.replace(make_function(tmp_path), logical_id="Churn", function_name="Churn")

    async def one(gate: asyncio.Semaphore) -> object:
        async with gate, open_environment(config) as env:
            return (await env.invoke(b"{}")).outcome

    async def churn(count: int) -> list[object]:
        gate = asyncio.Semaphore(AT_ONCE)
        return await asyncio.gather(*(one(gate) for _ in range(count)))

    run(churn(1))  # the loop library's thread pool starts at a first use, with a pipe of its own that it keeps
    fds = set(os.listdir("/proc/self/fd"))
    outcomes = run(churn(ENVIRONMENTS), timeout=240)
    failed = [o for o in outcomes if not isinstance(o, Response)]
    assert failed == [] and len(outcomes) == ENVIRONMENTS
    assert lambdabox_children() == set()
    assert leftovers() == []
    assert {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(os.listdir("/proc/self/fd")) - fds} == {}
