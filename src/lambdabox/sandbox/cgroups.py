"""Owns an environment's cgroups, on whichever hierarchy the host has, behind one interface (:class:`Cgroups`):
cgroup v2, one cgroup under lambdabox's own subtree (``memory.max`` with ``memory.swap.max`` 0, ``pids.max``,
``memory.peak``, ``memory.stat``, ``memory.events``, ``cgroup.freeze``, ``cgroup.kill``), or cgroup v1, a cgroup in
each of the memory and freezer controllers. :func:`make_cgroups` finds which, makes them, or says exactly what the
host lacks.

As root the v2 subtree is /sys/fs/cgroup/lambdabox. Without root only cgroup v2 serves, through a delegated subtree
(as ``systemd-run --user --scope -p Delegate=yes`` gives one): the cgroup lambdabox's own process is in (the ``0::``
line of /proc/self/cgroup) is delegated when the user can write it, its ``cgroup.procs`` and its
``cgroup.subtree_control``, and its ``cgroup.controllers`` lists memory and pids. Once per process, the processes in
it (lambdabox itself, perhaps its parent shell) move into a leaf child, ``lambdabox-supervisor`` (cgroup v2 lets no
process stay in a cgroup whose children use controllers), memory and pids are enabled for its children, and each
environment's cgroup is then made next to the supervisor, with the same limits as root's. The supervisor stays (it
holds lambdabox); an environment's cgroup goes with :meth:`Cgroups.remove`. cgroup v1 cannot be delegated.

An environment's cgroup is named after the lambdabox process that made it (:mod:`lambdabox.sandbox.leftovers`):
:func:`remove_left_behind` removes, once per process, those of lambdabox processes that died without removing them,
with whatever is still in them (frozen processes thawed first, to die)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from lambdabox.sandbox import leftovers

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2_PARENT = "lambdabox"  # lambdabox's own subtree on cgroup v2: /sys/fs/cgroup/lambdabox/<environment>
SUPERVISOR = "lambdabox-supervisor"  # without root: the leaf of the delegated cgroup that holds lambdabox itself
DELEGATE_HINT = "run it under `systemd-run --user --scope -p Delegate=yes lambdabox ...`"
PIDS_MAX = 1024  # Lambda's limit on an environment's processes and threads (Lambda quotas page)
DEADLINE_S = 5.0
"""Bound on every wait: frozen, killed, removed."""
POLL_S = 0.002


class Cgroups(abc.ABC):
    """One environment's cgroups (one on v2, two on v1)."""

    hierarchy: str  # "v2" or "v1", for what lambdabox says about the host
    mapped_file_key: str  # memory.stat's key for the mapped file pages charged to the cgroup (bytes)
    _memory_dir_fd: int | None = None  # the memory cgroup's directory, kept open by memory_pids

    @abc.abstractmethod
    def paths(self) -> tuple[Path, ...]:
        """The cgroups a process joins (each one's ``cgroup.procs``), in the order it joins them."""

    @property
    @abc.abstractmethod
    def memory_path(self) -> Path:
        """The cgroup that counts the environment's memory."""

    @abc.abstractmethod
    def peak_memory_bytes(self) -> int:
        """The most memory the environment's processes used together since the cgroup was made."""

    @abc.abstractmethod
    def oom_kill_count(self) -> int:
        """How many processes the kernel has killed for the memory limit (a count that only grows)."""

    @abc.abstractmethod
    def freeze(self, frozen: bool) -> None:
        """Start freezing (or thaw) every process; the kernel completes a freeze on its own, nothing waits."""

    @abc.abstractmethod
    def frozen(self) -> bool:
        """Whether the kernel reports the freeze complete: every process in the cgroups stopped."""

    @abc.abstractmethod
    async def kill_all(self) -> None:
        """SIGKILL every process in the cgroups, forks racing the kill included, and wait until none is left."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the files kept open; the cgroups themselves are removed by :meth:`remove`."""

    def pids(self) -> set[int]:
        """Every process in the cgroups."""
        return set().union(*(_read_pids(path) for path in self.paths()))

    def memory_pids(self) -> frozenset[int]:
        """The processes whose memory the cgroup counts, cheap enough for every invoke (a few µs): its
        ``cgroup.procs`` opened afresh, relative to the cgroup's directory kept open (a ``cgroup.procs`` kept open
        would not do: on cgroup v1 its rereads give the list of pids as it was when first read, for as long as it
        is reread within a second)."""
        if self._memory_dir_fd is None:
            self._memory_dir_fd = os.open(self.memory_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fd = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._memory_dir_fd)
        try:
            chunks = []
            while chunk := os.read(fd, 4096):  # a read gives at most a page of the list
                chunks.append(chunk)
        finally:
            os.close(fd)
        return frozenset(int(pid) for pid in b"".join(chunks).split())

    def mapped_file_bytes(self) -> int:
        """The file pages charged to the cgroup that some process maps, in bytes (memory.stat's ``file_mapped`` on
        v2, ``mapped_file`` on v1; shared memory included)."""
        return _key_value(self.memory_path / "memory.stat").get(self.mapped_file_key, 0)

    async def remove(self) -> list[str]:
        """Remove the cgroups (killing what is left in them); the problems met."""
        return [problem for path in self.paths() if (problem := await _remove(path)) is not None]


class CgroupsV2(Cgroups):
    """One cgroup of the unified hierarchy."""

    hierarchy = "v2"
    mapped_file_key = "file_mapped"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._freeze_fd: int | None = None
        self._peak_fd: int | None = None
        self._has_peak = (path / "memory.peak").exists()  # Linux 5.19 and later
        self._sampled_peak = 0

    def paths(self) -> tuple[Path, ...]:
        return (self.path,)

    @property
    def memory_path(self) -> Path:
        return self.path

    def peak_memory_bytes(self) -> int:
        if not self._has_peak:  # sampled at each reading where the kernel keeps no peak
            self._sampled_peak = max(self._sampled_peak, int((self.path / "memory.current").read_text()))
            return self._sampled_peak
        if self._peak_fd is None:  # read once per invoke: an open descriptor and pread keep it cheap
            self._peak_fd = os.open(self.path / "memory.peak", os.O_RDONLY)
        return int(os.pread(self._peak_fd, 32, 0))

    def oom_kill_count(self) -> int:
        return _key_value(self.path / "memory.events").get("oom_kill", 0)

    def freeze(self, frozen: bool) -> None:
        if self._freeze_fd is None:  # written twice per invoke: kept open
            self._freeze_fd = os.open(self.path / "cgroup.freeze", os.O_WRONLY)
        os.write(self._freeze_fd, b"1" if frozen else b"0")

    def frozen(self) -> bool:
        return _key_value(self.path / "cgroup.events").get("frozen") == 1

    async def kill_all(self) -> None:
        kill = self.path / "cgroup.kill"
        if kill.exists():  # Linux 5.14 and later: every process, at once, forks included
            kill.write_text("1")
        else:
            self.freeze(True)
            await _poll(self.frozen, "freeze")
            _signal_all(self.pids(), signal.SIGKILL)
            self.freeze(False)
        await _poll(lambda: not _signal_all(self.pids(), signal.SIGKILL), "kill")

    def close(self) -> None:
        for fd in (self._freeze_fd, self._peak_fd, self._memory_dir_fd):
            if fd is not None:
                os.close(fd)
        self._freeze_fd = self._peak_fd = self._memory_dir_fd = None


class CgroupsV1(Cgroups):
    """A cgroup in the memory controller (the limit, peak, OOM kills) and one in the freezer controller."""

    hierarchy = "v1"
    mapped_file_key = "mapped_file"  # this cgroup's own (total_mapped_file adds its children's: it has none)

    def __init__(self, memory: Path, freezer: Path) -> None:
        self.memory = memory
        self.freezer = freezer
        self._peak_fd: int | None = None
        self._freezer_fd: int | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.freezer, self.memory)  # freezer first: whatever the memory cgroup counts can also be frozen

    @property
    def memory_path(self) -> Path:
        return self.memory

    def peak_memory_bytes(self) -> int:
        if self._peak_fd is None:
            self._peak_fd = os.open(self.memory / "memory.max_usage_in_bytes", os.O_RDONLY)
        return int(os.pread(self._peak_fd, 32, 0))

    def oom_kill_count(self) -> int:
        # The oom_kill counter came with Linux 4.13; before it, the times the limit was hit.
        counts = _key_value(self.memory / "memory.oom_control")
        return counts["oom_kill"] if "oom_kill" in counts else int((self.memory / "memory.failcnt").read_text())

    def freeze(self, frozen: bool) -> None:
        self._write_freezer("FROZEN" if frozen else "THAWED")  # a thaw is complete when the write returns

    def frozen(self) -> bool:
        return (self.freezer / "freezer.state").read_text().strip() == "FROZEN"

    async def kill_all(self) -> None:
        with contextlib.suppress(TimeoutError, OSError):  # frozen first: nothing forks between listing and killing
            self._write_freezer("FROZEN")
            await _poll(self.frozen, "freeze")
        _signal_all(self.pids(), signal.SIGKILL)
        self._write_freezer("THAWED")  # frozen tasks die only once thawed
        await _poll(lambda: not _signal_all(self.pids(), signal.SIGKILL), "kill")  # late forks too

    def close(self) -> None:
        for fd in (self._peak_fd, self._freezer_fd, self._memory_dir_fd):
            if fd is not None:
                os.close(fd)
        self._peak_fd = self._freezer_fd = self._memory_dir_fd = None

    def _write_freezer(self, state: str) -> None:
        if self._freezer_fd is None:
            self._freezer_fd = os.open(self.freezer / "freezer.state", os.O_WRONLY)
        os.write(self._freezer_fd, state.encode())


def make_cgroups(name: str, memory_mb: int, root: Path | None = None) -> tuple[Cgroups | None, str | None]:
    """The environment's cgroups on the host's hierarchy (at ``root``, default CGROUP_ROOT), with its memory limit;
    or None and why they cannot be had (the reason names what is missing). Without root, on cgroup v2, under the
    cgroup delegated to the user that lambdabox runs in (see the module's docstring)."""
    root = root or CGROUP_ROOT
    leaf = f"{leftovers.owner()}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}-{secrets.token_hex(4)}"
    limit = memory_mb * 1024 * 1024
    if os.geteuid() != 0:
        if (root / "cgroup.controllers").exists():
            return _make_delegated(root, leaf, limit)
        if any((root / controller).is_dir() for controller in ("memory", "freezer")):
            return None, "not root, and cgroup v1 cannot be delegated (its cgroups are made as root)"
        return None, f"not root, and there is no cgroup v2 at {root} to be delegated"
    if (root / "cgroup.controllers").exists():
        return _make_v2(root, leaf, limit)
    for controller, probe in (("memory", "memory.limit_in_bytes"), ("freezer", "cgroup.procs")):
        if not (root / controller / probe).exists():
            return None, f"neither cgroup v2 at {root} nor a cgroup v1 {controller} controller at {root / controller}"
    return _make_v1(root, f"lambdabox-{leaf}", limit)


async def remove_left_behind(root: Path | None = None) -> list[str]:
    """Remove the environments' cgroups left by lambdabox processes that are gone, the first time this process asks
    (after its first :func:`make_cgroups`, which finds the delegated cgroup without root); what was done."""
    root = root or CGROUP_ROOT
    if os.geteuid() != 0:
        places = [(_delegated[root], "")] if root in _delegated else []
    elif (root / "cgroup.controllers").exists():
        places = [(root / V2_PARENT, "")]
    else:  # freezer first: a frozen process dies only once thawed
        places = [(root / "freezer", "lambdabox-"), (root / "memory", "lambdabox-")]
    said = []
    for parent, prefix in places:
        if not leftovers.first_time(parent):
            continue
        removed, failed = [], []
        for path in leftovers.orphans(parent, prefix):
            with contextlib.suppress(OSError):  # thawed, to die (v1, v2)
                (path / "freezer.state").write_text("THAWED")
            with contextlib.suppress(OSError):
                (path / "cgroup.freeze").write_text("0")
            if (problem := await _remove(path)) is None:
                removed.append(path)
            else:
                failed.append(problem)
        if removed:
            what = "a cgroup" if len(removed) == 1 else f"{len(removed)} cgroups"
            said.append(f"removed {what} in {parent} left by lambdabox processes that are gone")
        said += [f"could not remove a cgroup left by a lambdabox process that is gone: {why}" for why in failed]
    return said


_delegated: dict[Path, Path] = {}  # cgroup root -> the delegated cgroup set up for this process (once per process)
_delegated_lock = threading.Lock()


def _make_delegated(root: Path, leaf: str, limit: int) -> tuple[Cgroups | None, str | None]:
    """Without root: the environment's cgroup next to the supervisor, in the cgroup delegated to the user."""
    with _delegated_lock:
        parent = _delegated.get(root)
        if parent is None:
            parent, why = _set_up_delegated(root)
            if parent is None:
                return None, why
            _delegated[root] = parent
    try:
        (parent / leaf).mkdir()
    except OSError as error:
        return None, f"cannot make a cgroup under the delegated {parent}: {error}"
    return _set_limits(parent / leaf, limit)


def _own_cgroup() -> str | None:
    """The cgroup v2 path this process is in (``/user.slice/...``), from /proc/self/cgroup's ``0::`` line."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::/"):
                return line[3:]
    return None


def _set_up_delegated(root: Path) -> tuple[Path | None, str | None]:
    """Find the delegated cgroup lambdabox runs in, move its processes into the supervisor and enable memory and
    pids for its children; each step idempotent (another lambdabox of the same cgroup may be doing the same)."""
    own = _own_cgroup()
    if own is None:
        return None, "not root, and /proc/self/cgroup names no cgroup v2 that lambdabox runs in"
    shown = PurePosixPath(own)
    if shown.name == SUPERVISOR:  # moved there by an earlier lambdabox (or started by a process that was)
        shown = shown.parent
    cgroup = root / str(shown).lstrip("/")
    uid = os.geteuid()
    unwritable = [
        str(path.relative_to(cgroup)) if path != cgroup else "the directory"
        for path in (cgroup, cgroup / "cgroup.procs", cgroup / "cgroup.subtree_control")
        if not os.access(path, os.W_OK)
    ]
    if unwritable:
        return None, (
            f"not root, and the cgroup {shown} lambdabox runs in is not delegated to uid {uid}: "
            f"{', '.join(unwritable)} not writable ({DELEGATE_HINT})"
        )
    try:
        available = set((cgroup / "cgroup.controllers").read_text().split())
    except OSError as error:
        return None, f"not root, and the cgroup {shown} lambdabox runs in has no readable cgroup.controllers: {error}"
    if missing := sorted({"memory", "pids"} - available):
        noun = "controller" if len(missing) == 1 else "controllers"
        return None, (
            f"not root, and the cgroup {shown} delegated to uid {uid} lacks the {' and '.join(missing)} {noun} "
            f"(not enabled in its parent's cgroup.subtree_control)"
        )
    supervisor = cgroup / SUPERVISOR
    try:
        supervisor.mkdir(exist_ok=True)
    except OSError as error:
        return None, f"not root, and cannot make {supervisor} in the delegated cgroup: {error}"
    deadline = time.monotonic() + DEADLINE_S
    while True:  # a process forked into the cgroup meanwhile makes the enabling fail (EBUSY): move it too, retry
        try:
            for pid in _read_pids(cgroup):
                with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                    (supervisor / "cgroup.procs").write_text(str(pid))
            _enable(cgroup, "memory", "pids")
            return cgroup, None
        except OSError as error:
            if time.monotonic() > deadline:
                return None, (
                    f"not root, and cannot move the processes of the delegated {cgroup} into {supervisor} "
                    f"and enable memory and pids for its children: {error}"
                )
        time.sleep(POLL_S)


def _make_v2(root: Path, leaf: str, limit: int) -> tuple[Cgroups | None, str | None]:
    missing = {"memory", "pids"} - set((root / "cgroup.controllers").read_text().split())
    if missing:
        return None, f"cgroup v2 at {root} has no {' and no '.join(sorted(missing))} controller"
    parent, path = root / V2_PARENT, root / V2_PARENT / leaf
    try:
        _enable(root, "memory", "pids")
        parent.mkdir(exist_ok=True)
        _enable(parent, "memory", "pids")
        path.mkdir()
    except OSError as error:
        return None, f"cannot make a cgroup under {parent}: {error}"
    return _set_limits(path, limit)


def _set_limits(path: Path, limit: int) -> tuple[Cgroups | None, str | None]:
    """The limits of an environment's cgroup v2: memory (no swap) and Lambda's process limit."""
    try:
        (path / "memory.max").write_text(str(limit))
        with contextlib.suppress(FileNotFoundError):  # no such file when swap accounting is off
            (path / "memory.swap.max").write_text("0")
        (path / "pids.max").write_text(str(PIDS_MAX))
    except OSError as error:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None, f"cannot set the limits of {path}: {error}"
    return CgroupsV2(path), None


def _enable(cgroup: Path, *controllers: str) -> None:
    """Let ``cgroup``'s children use ``controllers`` (written only where they are not enabled yet)."""
    enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    if wanted := [c for c in controllers if c not in enabled]:
        (cgroup / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))


def _make_v1(root: Path, leaf: str, limit: int) -> tuple[Cgroups | None, str | None]:
    made: list[Path] = []
    try:
        (memory := root / "memory" / leaf).mkdir()
        made.append(memory)
        (memory / "memory.limit_in_bytes").write_text(str(limit))
        if int((memory / "memory.limit_in_bytes").read_text()) != limit:
            raise OSError(f"memory.limit_in_bytes did not take {limit}")
        with contextlib.suppress(OSError):  # no such file when swap accounting is off
            (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
        (freezer := root / "freezer" / leaf).mkdir()
        made.append(freezer)
        if not (freezer / "freezer.state").exists():
            raise OSError(f"{freezer} has no freezer.state")
    except OSError as error:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()
        return None, f"cannot set up cgroups: {error}"
    return CgroupsV1(memory, freezer), None


def _key_value(path: Path) -> dict[str, int]:
    """A flat keyed file such as memory.events or cgroup.events: ``key value`` per line."""
    pairs = (line.split() for line in path.read_text().splitlines())
    return {pair[0]: int(pair[1]) for pair in pairs if len(pair) == 2 and pair[1].isdigit()}


def _read_pids(cgroup: Path) -> set[int]:
    try:
        return {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _signal_all(pids: set[int], sig: int) -> set[int]:
    """Send ``sig`` to each pid (gone ones are skipped); the pids."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _try_rmdir(path: Path) -> bool:
    """Remove a cgroup, killing what is in it (a process spawned just before the kill joins late)."""
    _signal_all(_read_pids(path), signal.SIGKILL)
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY while the last tasks exit
        return False
    return True


async def _remove(path: Path) -> str | None:
    """Remove one cgroup, killing what is left in it; None, or the problem met."""
    try:
        await _poll(functools.partial(_try_rmdir, path), f"rmdir {path}")
    except TimeoutError as error:
        return str(error)
    return None


async def _poll(done: Callable[[], bool], what: str) -> None:
    """Wait until ``done()``, polling every few ms, at most DEADLINE_S (TimeoutError naming ``what``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not done():
        if loop.time() > deadline:
            raise TimeoutError(f"cgroups: {what} not done after {DEADLINE_S:g} s")
        await asyncio.sleep(POLL_S)
