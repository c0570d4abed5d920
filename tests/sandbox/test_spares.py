"""Holders started ahead (``held.Spares``, as start-lambda's server has them): an environment takes one and works as
with its own; the one taken is replaced; one that died is not handed out; nothing is left when they close."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import psutil
import pytest

from lambdabox.core.model import Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.sandbox.held import open_spares
from lambdabox.sandbox.namespace import files_dir
from support import make_function, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a holder's namespaces, made as root here")


def holders() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "holder.main()" in " ".join(p.cmdline())}


def test_environments_take_holders_started_ahead_and_nothing_is_left(tmp_path: Path) -> None:
    config = make_function(tmp_path)

    async def go() -> tuple[list[object], list[bool], set[int], list[Path]]:
        files: list[Path] = []

        def made() -> Path:
            files.append(files_dir())
            return files[-1]

        outcomes, ahead = [], []
        async with open_spares(made) as spares:
            spares.fill()  # as start-lambda's server does: one ahead for the first environment too
            for _ in range(100):
                if spares._spare is not None:
                    break
                await asyncio.sleep(0.01)
            for _ in range(3):
                spare_before = spares._spare is not None  # one was started ahead for this environment
                async with open_environment(config, Options(spares=spares)) as env:
                    outcomes.append((await env.invoke(b"{}")).outcome)
                ahead.append(spare_before)
                for _ in range(100):  # the replacement is a task of the spares' group: let it start
                    if spares._spare is not None:
                        break
                    await asyncio.sleep(0.01)
        return outcomes, ahead, holders(), [f for f in files if f.exists()]

    outcomes, ahead, left, dirs = run(go())
    assert all(isinstance(o, Response) for o in outcomes)
    assert ahead == [True, True, True]  # each environment took one started ahead
    assert left == set() and dirs == []


def test_a_taker_gets_the_spare_being_started_rather_than_starting_another(tmp_path: Path) -> None:
    async def go() -> tuple[Path, list[Path], set[int]]:
        files: list[Path] = []

        def made() -> Path:
            files.append(files_dir())
            return files[-1]

        async with open_spares(made) as spares:
            spares.fill()
            taken = await spares.take()  # at once: the spare is still starting
            try:
                assert taken.alive
                await asyncio.sleep(0)
                assert spares._coming is None  # its replacement is not started within the taker's own opening
                for _ in range(100):  # its replacement is a task of the spares' group: let it start
                    if spares._spare is not None:
                        break
                    await asyncio.sleep(0.01)
                return taken.files, list(files), holders()
            finally:
                await taken.discard()

    taken, made_dirs, running = run(go())
    assert taken == made_dirs[0]  # the one being started
    assert len(made_dirs) == 2  # and its replacement: no third holder
    assert len(running) == 2


def test_a_spare_that_died_is_not_handed_out(tmp_path: Path) -> None:
    async def go() -> tuple[bool, bool]:
        async with open_spares(files_dir) as spares:
            first = await spares.take()
            await first.drop()
            for _ in range(100):
                if spares._spare is not None:
                    break
                await asyncio.sleep(0.01)
            assert spares._spare is not None
            os.kill(spares._spare.process.pid, signal.SIGKILL)
            await spares._spare.process.wait()
            taken = await spares.take()
            alive = taken.alive
            await taken.drop()
            return alive, taken.files.exists()

    assert run(go()) == (True, False)
