"""The resident file-backed pages an environment's processes map (``memory``): what counts (file pages, each
mapping once across processes; not anonymous pages, not a private mapping's copied-on-write ones), and that
``Isolation.peak_memory_bytes`` adds those charged to another cgroup than the environment's, recomputing them only
when the cgroup's peak or its processes change."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from lambdabox.sandbox import memory
from lambdabox.sandbox.isolation import Isolation, open_isolation
from lambdabox.sandbox.namespace import Layout
from lambdabox.sandbox.processes import OwnedProcess
from support import host_cgroups, run

PY = sys.executable
MIB = 1 << 20
needs_full = pytest.mark.skipif(host_cgroups() is None, reason="needs root and cgroups (v2, or v1 memory and freezer)")

# Maps the file named by argv[1] (shared, or private and written to when argv[2] is "cow"), touches every page,
# says so and waits to be killed.
MAPPER = """
import mmap, signal, sys
cow = sys.argv[2] == "cow"
with open(sys.argv[1], "rb") as f:  # read-only: /var/task is
    if cow:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    else:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
for i in range(0, len(m), mmap.PAGESIZE):
    if cow:
        m[i] = 1
    else:
        m[i]
print("mapped", flush=True)
signal.pause()
"""


def make_blob(path: Path, size: int) -> Path:
    """A file of ``size`` bytes, read back whole so that its pages are in the page cache, charged to this process's
    cgroup."""
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    with path.open("rb") as f:
        while f.read(MIB):
            pass
    return path


@contextmanager
def mappers(blob: Path, *modes: str) -> Iterator[list[int]]:
    """Children of this process, each mapping ``blob`` (``shared`` or ``cow``) once each has touched every page;
    their pids."""
    procs = [subprocess.Popen([PY, "-c", MAPPER, str(blob), mode], stdout=subprocess.PIPE) for mode in modes]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"mapped\n"
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()  # reaped, its pipe closed


def blob_bytes(pid: int, blob: Path) -> int:
    """The resident file-backed bytes ``pid`` maps of ``blob``."""
    inode = blob.stat().st_ino
    return sum(size for (_dev, ino, _offset, _size), size in memory.file_mappings(pid).items() if ino == inode)


def test_a_mapped_files_resident_pages_count_once_across_processes(tmp_path: Path) -> None:
    blob = make_blob(tmp_path / "blob", 16 * MIB)
    with mappers(blob, "shared", "shared") as (a, b):
        assert blob_bytes(a, blob) == blob_bytes(b, blob) == 16 * MIB
        one, both = memory.mapped_file_bytes([a]), memory.mapped_file_bytes([a, b])
        shared = psutil.Process(a).memory_info().shared  # the kernel's RssFile + RssShmem (statm)
    assert one >= 16 * MIB
    assert abs(one - shared) < MIB  # one process maps each of its mappings once: the kernel's own figure
    assert both - one < 8 * MIB  # the same interpreter, libraries and file: counted once


def test_copied_on_write_and_anonymous_pages_do_not_count(tmp_path: Path) -> None:
    blob = make_blob(tmp_path / "blob", 16 * MIB)
    with mappers(blob, "cow") as (pid,):
        assert blob_bytes(pid, blob) == 0  # every page of the private mapping written: anonymous now
        assert memory.mapped_file_bytes([pid]) < 16 * MIB
        assert psutil.Process(pid).memory_info().rss > 16 * MIB


def test_a_process_that_is_gone_is_skipped(tmp_path: Path) -> None:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    mine = memory.mapped_file_bytes([os.getpid()])
    assert memory.file_mappings(proc.pid) == {}
    assert mine > 0
    assert memory.mapped_file_bytes([proc.pid, os.getpid()]) == pytest.approx(mine, abs=MIB)


def test_the_uncharged_figure_is_rescanned_only_when_the_peak_or_the_processes_change(tmp_path: Path) -> None:
    scans: list[frozenset[int]] = []

    def scan(pids: Iterable[int]) -> int:
        scans.append(frozenset(pids))
        return memory.mapped_file_bytes(pids)

    uncharged = memory.UnchargedFiles(scan=scan)
    blob = make_blob(tmp_path / "blob", 16 * MIB)
    with mappers(blob, "shared", "shared") as (a, b):
        first = uncharged.update(100, frozenset({a}), lambda: 0)
        assert first >= 16 * MIB
        assert uncharged.update(100, frozenset({a}), lambda: 0) == first
        assert len(scans) == 1  # nothing changed: the figure is reused
        uncharged.update(200, frozenset({a}), lambda: 0)  # the peak changed
        uncharged.update(200, frozenset({a, b}), lambda: 0)  # the processes changed
        assert scans == [{a}, {a}, {a, b}]
        assert uncharged.update(300, frozenset({a}), lambda: first) == uncharged.bytes >= first  # the largest seen
    assert uncharged.update(300, frozenset(), lambda: 0) >= first  # no process left: kept, nothing scanned
    assert len(scans) == 4


# ---- through Isolation (cgroups) -------------------------------------------------------------------------------


def make_layout(root: Path) -> Layout:
    """A layout whose processes can run this interpreter."""
    layout = Layout(
        task=root / "task", opt=root / "opt", tmp=root / "tmp", keep=(Path(sys.prefix), Path(sys.base_prefix))
    )
    for d in (layout.task, layout.opt, layout.tmp):
        d.mkdir(parents=True)
    return layout


async def spawn(iso: Isolation, argv: list[str], on_line: Callable[[str], object]) -> OwnedProcess:
    """Start ``argv`` in the environment (at /var/task), each of its output lines to ``on_line``."""
    proc = await OwnedProcess.start(
        argv,
        env=dict(os.environ),
        cwd="/var/task",
        label="fn",
        on_record=lambda _label, text: on_line(text),
        spawn=iso.spawn,
    )
    iso.register(proc.pid)
    return proc


@needs_full
@pytest.mark.cgroup2
def test_peak_memory_counts_a_mapped_file_already_in_the_page_cache(tmp_path: Path) -> None:
    """The file's pages were charged to this test's cgroup when it wrote and read them, so the environment's cgroup
    is not charged when its process maps them; Lambda, whose microVM reads them afresh, counts them."""
    layout = make_layout(tmp_path)
    make_blob(layout.task / "blob", 48 * MIB)

    async def body() -> tuple[int, int, int, int]:
        async with open_isolation(layout, memory_mb=512, name="mapped") as iso:
            records: list[str] = []
            idle = await spawn(iso, [PY, "-c", "print('up')"], records.append)
            assert await idle.wait_exit() == 0, records
            base = iso.peak_memory_bytes()
            mapped = asyncio.Event()
            proc = await spawn(
                iso, [PY, "-c", MAPPER, "blob", "shared"], lambda text: text == "mapped" and mapped.set()
            )
            async with asyncio.timeout(30):
                await mapped.wait()
            peak = iso.peak_memory_bytes()
            again = iso.peak_memory_bytes()
            assert iso.cgroups is not None
            charged = iso.cgroups.mapped_file_bytes()
            proc.signal(signal.SIGKILL)
            async with asyncio.timeout(10):
                await proc.wait_exit()
            return base, peak, again, charged

    base, peak, again, charged = run(body())
    assert charged < 16 * MIB  # the premise: the file's pages are charged elsewhere
    assert peak - base >= 45 * MIB
    assert peak - base < 96 * MIB  # the file counted once
    assert again == peak
