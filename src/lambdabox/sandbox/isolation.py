"""Owns an environment's isolation: it composes the namespaces (``namespace``) and the cgroups (``cgroups``),
and stands in for them where the machine cannot give them (host paths, SIGSTOP/SIGCONT, sampled peak memory);
``degraded`` says what differs from Lambda.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import psutil

from lambdabox.core.errors import SandboxError
from lambdabox.loop import open_task_group
from lambdabox.sandbox import leftovers, memory, outbound
from lambdabox.sandbox.cgroups import Cgroups, make_cgroups, remove_left_behind
from lambdabox.sandbox.held import Holder, Spares
from lambdabox.sandbox.namespace import DEADLINE_S, Layout, Namespace
from lambdabox.sandbox.processes import Child, spawn_here

SAMPLE_EVERY_S = 0.01
MIB = 1024 * 1024


async def _poll(done: Callable[[], bool], what: str) -> None:
    """Wait until ``done()`` is true, polling every few ms, at most DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not done():
        if loop.time() > deadline:
            raise SandboxError(f"{what}: not done after {DEADLINE_S}s")
        await asyncio.sleep(0.002)


class Isolation:
    """One environment's namespace and cgroups (or their degraded stand-ins)."""

    def __init__(self, layout: Layout, memory_mb: int, *, network: bool = True, spares: Spares | None = None) -> None:
        self.layout = layout
        self._spares = spares  # holders started ahead (start-lambda's), or None: one is started when needed
        self.memory_mb = memory_mb
        self.api_port: int | None = None  # without a network namespace: the Runtime API's port (for ``degraded``)
        self._found: tuple[str, ...] = ()
        self.cleaned: tuple[str, ...] = ()  # what an earlier lambdabox left behind and this one removed
        self._namespace = Namespace(layout, network=network)
        self._outbound = outbound.Outbound()
        self._cgroups: Cgroups | None = None
        self._registered: set[int] = set()
        self._stopped: set[int] = set()  # SIGSTOPped by a degraded freeze
        self._frozen = False
        self._peak = 0
        self._uncharged = memory.UnchargedFiles()  # with cgroups: the mapped file pages charged elsewhere
        self._sampler: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> tuple[str, ...]:
        """What differs from Lambda here, one sentence each; empty when nothing does."""
        if self._namespace.net_why is None:
            return self._found
        at = f"127.0.0.1:{self.api_port}" if self.api_port is not None else "a port of its own on 127.0.0.1"
        return (
            *self._found,
            f"no network namespace ({self._namespace.net_why}): the Runtime API is at {at}, not 127.0.0.1:9001, "
            "and extensions share the host's ports",
        )

    @property
    def net_namespace(self) -> str | None:
        """The environment's network namespace (a path to open, as ``/proc/<pid>/ns/net``), None without one."""
        return self._namespace.net_path

    @property
    def namespaced(self) -> bool:
        """Whether the environment has its namespaces (Lambda's paths, user and filesystem)."""
        return self._namespace.active

    def show_runtime(self, lang: str | None, runtime: str | None) -> bool:
        """Show the runtime's interpreter directory at /var/lang and its runtime client at /var/runtime, as Lambda
        has them (only with namespaces); whether they are shown."""
        if (holder := self._namespace.holder) is None:
            return False
        try:
            for source, target in ((lang, "/var/lang"), (runtime, "/var/runtime")):
                if source is not None:
                    holder.show(source, target)
        except OSError:
            return False
        return True

    @property
    def sockets(self) -> Holder | None:
        """What makes sockets inside the environment's network namespace (``sockets.socket()``), None without one."""
        return self._namespace.holder if self._namespace.net_path is not None else None

    def take_api_listener(self) -> socket.socket | None:
        """The Runtime API's listening socket inside the network namespace (127.0.0.1:9001), once; None without."""
        listener, self._namespace.listener = self._namespace.listener, None
        return listener

    async def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdout: int,
        stderr: int,
        telemetry: int | None,
        *,
        ahead: bool = False,
    ) -> Child:
        """Start ``argv`` in the environment at /var/task, with its stdout and stderr (and awslambdaric's telemetry
        pipe) on the descriptors given: through the holder, or where there is none, as a child of lambdabox's own
        that joins the cgroups first. ``ahead``: another process of the Init will be started after this one (the
        holder forks its process ahead, into the cgroups)."""
        if self._namespace.active:
            return await self._namespace.spawn(argv, env, "/var/task", stdout, stderr, telemetry, ahead=ahead)
        return await spawn_here(self._command(argv), env, stdout, stderr, telemetry, cwd=self.path("/var/task"))

    def _command(self, argv: Sequence[str]) -> list[str]:
        """The argv that joins the cgroups before ``argv`` is exec'd (no namespaces: no holder)."""
        paths = self._cgroups.paths() if self._cgroups is not None else ()
        steps = [f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}" for cg in paths]
        if not steps:
            return list(argv)
        return ["/bin/sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh", *argv]

    def path(self, lambda_path: str) -> str:
        """The path to use for a Lambda path: itself inside the namespace, else the host dir behind it."""
        return self._namespace.path(lambda_path)

    def register(self, pid: int) -> None:
        """Track a started process (needed without cgroups, harmless otherwise)."""
        self._registered.add(pid)

    def pids(self) -> list[int]:
        """Every live process of the environment."""
        if self._cgroups is not None:
            return sorted(self._cgroups.pids())
        found: set[int] = set()
        for pid in list(self._registered):
            tree = _tree(pid)
            if not tree:
                self._registered.discard(pid)
            found.update(p for p in tree if _status(p) not in ("Z", None))
        return sorted(found)

    def peak_memory_bytes(self) -> int:
        """Peak memory of all the environment's processes together since it was made, file pages they map
        included, as Lambda counts it (at most MemorySize).

        With cgroups: the cgroup's peak, plus the resident file pages the processes map that are charged to other
        cgroups (those already in the host's page cache when the environment mapped them: the interpreter, its
        libraries), which Lambda counts since every microVM starts cold: the largest figure seen of their mapped
        file pages less the cgroup's own (``memory.UnchargedFiles``). That figure is recomputed (every process's
        smaps, about a millisecond each) only when the cgroup's peak or its set of processes has changed since the
        last computation, else reused: a warm invoke reads the peak and ``cgroup.procs``. Without cgroups: the
        largest sample of the processes' RSS, file pages included."""
        if self._cgroups is not None:
            cgroups = self._cgroups
            peak = cgroups.peak_memory_bytes()
            uncharged = self._uncharged.update(peak, cgroups.memory_pids(), cgroups.mapped_file_bytes)
            return min(peak + uncharged, self.memory_mb * MIB)
        if not self._frozen:
            self._sample()
        return self._peak

    def oom_kill_count(self) -> int:
        """OOM kills in the cgroup (or, on kernels without that counter, times the limit was hit); 0 without one."""
        return 0 if self._cgroups is None else self._cgroups.oom_kill_count()

    @property
    def cgroups(self) -> Cgroups | None:
        """The environment's cgroups (on the host's hierarchy: ``cgroups.hierarchy``); None without them."""
        return self._cgroups

    def freeze_at_once(self) -> None:
        """Start freezing every process of the environment; nothing waits for them to stop. The cgroup freezer
        completes a freeze on its own (a THAWED written while still FREEZING undoes it); without it, SIGSTOP is
        sent to each process (a SIGCONT sent before it takes effect undoes it), so the next invoke's thaw is
        never held behind a freeze."""
        if self._cgroups is not None:
            self._cgroups.freeze(True)
            return
        self._frozen = True
        self._stopped.update(_kill(signal.SIGSTOP, self.pids()))

    def thaw(self) -> None:
        if self._cgroups is not None:
            self._cgroups.freeze(False)
            return
        _kill(signal.SIGCONT, self._stopped | set(self.pids()))
        self._stopped.clear()
        self._frozen = False

    async def kill_all(self) -> None:
        """SIGKILL everything in the environment and wait (bounded) until none is left.

        A process that has not joined the cgroups yet (started without a holder) is not seen here (the
        teardown catches it); do not spawn while this runs.
        """
        if (holder := self._namespace.holder) is not None:
            holder.kill_all()  # orphans too, which no process tree holds
        if self._cgroups is not None:
            try:
                await self._cgroups.kill_all()
            except TimeoutError as error:
                raise SandboxError(str(error)) from None
            return
        _kill(signal.SIGKILL, self.pids())
        self._stopped.clear()
        self._frozen = False
        await _poll(lambda: not _kill(signal.SIGKILL, self.pids()), "kill_all")  # late forks too

    def _sample(self) -> None:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        self._peak = max(self._peak, total)

    async def _sample_forever(self) -> None:
        while True:
            if not self._frozen:
                await asyncio.to_thread(self._sample)
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def _open(self, name: str, isolate: bool, tasks: asyncio.TaskGroup) -> None:
        for what in ("task", "opt", "tmp"):
            if not os.path.isdir(path := getattr(self.layout, what)):  # noqa: ASYNC240 (a stat)
                raise SandboxError(f"layout.{what} {path} is not a directory")
        self._cgroups, cg_why = make_cgroups(name, self.memory_mb) if isolate else (None, "isolate=False")
        self.cleaned = (
            *(await remove_left_behind() if isolate else ()),
            *await asyncio.to_thread(leftovers.remove_temporary_dirs),
        )
        out_why = outbound.probe()
        if isolate:
            procs = [path / "cgroup.procs" for path in self._cgroups.paths()] if self._cgroups is not None else []
            ns_why = await self._namespace.start(outbound=out_why is None, cgroup_procs=procs, spares=self._spares)
        else:
            ns_why = self._namespace.net_why = "isolate=False"
        found: list[str] = []
        if (net := self._namespace.net_path) is not None and self._namespace.files_dir is not None:
            if out_why is None:
                user = self._namespace.holder.user_path if self._namespace.holder is not None else None
                out_why = await self._outbound.start(net, self._namespace.files_dir / "slirp4netns.log", user)
            if out_why is not None:
                found.append(
                    f"no outbound network ({out_why}): the environment reaches only its own loopback, not the "
                    "internet nor this machine (install slirp4netns, or use the host's network)"
                )
        if ns_why is not None:
            found += [
                f"no mount namespace ({ns_why}): code is at {self.layout.task}, not /var/task",
                f"layers are at {self.layout.opt}, not /opt; tmp is {self.layout.tmp}, not /tmp",
                "code, layers and the host's files are writable (read-only in Lambda)",
                "processes run as lambdabox's own user, with its limits, seeing every process of the machine (in "
                "Lambda: as sbx_user1051, without capabilities, 1,024 open files, alone)",
                "/etc/hosts unchanged: sandbox.localdomain may not resolve",
            ]
        if cg_why is not None:
            found += [
                f"no memory limit ({cg_why}): MemorySize is not enforced and OOM kills are not seen",
                f"peak memory is sampled every {SAMPLE_EVERY_S * 1000:.0f} ms, not counted by the kernel",
                "freezing sends SIGSTOP/SIGCONT to the registered processes' trees, not the cgroup freezer",
            ]
            self._sampler = tasks.create_task(self._sample_forever(), name="lambdabox-memory-sampler")
        self._found = tuple(found)

    async def _close(self) -> list[str]:
        """Release everything (each step runs even if an earlier one fails); the problems met."""
        problems: list[str] = []
        self._outbound.stop_soon()  # its exit overlaps with the rest
        if self._sampler is not None:
            self._sampler.cancel()
        try:
            await self.kill_all()
        except Exception as e:  # any failure is told, and the steps below still run
            problems.append(str(e))
        if self._cgroups is not None:
            self._cgroups.close()
            problems += await self._cgroups.remove()
            self._cgroups = None
        try:
            await self._outbound.close()
        except (TimeoutError, OSError) as e:
            problems.append(f"slirp4netns did not stop: {e!r}")
        try:
            await self._namespace.close()
        except (TimeoutError, OSError) as e:
            problems.append(f"the holder did not stop: {e!r}")
        if self._namespace.files_dir is not None:
            shutil.rmtree(self._namespace.files_dir, ignore_errors=True)
        return problems


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (none when it is gone), from the kernel's per-thread ``children`` lists: the
    cost grows with the environment's processes, not with the machine's."""
    if not os.path.exists(f"/proc/{root}/task/{root}/children"):
        try:  # a kernel without the lists (or root gone): psutil scans every process
            parent = psutil.Process(root)
            return [root, *(p.pid for p in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
    return found


def _kill(sig: int, pids: Iterable[int]) -> list[int]:
    """Send ``sig`` to each pid (gone ones are skipped); the pids."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _status(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat (R, S, D, T, Z...), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


@asynccontextmanager
async def open_isolation(
    layout: Layout,
    *,
    memory_mb: int,
    name: str,
    isolate: bool = True,
    network: bool = True,
    spares: Spares | None = None,
) -> AsyncIterator[Isolation]:
    """An environment's isolation for the life of the block; torn down even on error or cancel.

    ``network=False`` keeps the environment in the host's network namespace even where it could have its own;
    ``spares``: take the holder from these (see :class:`lambdabox.sandbox.held.Spares`).
    """
    iso = Isolation(layout, memory_mb, network=network, spares=spares)
    # The teardown is a task awaited here at once, shielded: a cancellation must not leave a cgroup, a namespace or
    # a process behind. The memory sampler (degraded mode) is a task of the isolation's own group.
    try:
        async with open_task_group() as tasks:
            await iso._open(name, isolate, tasks)
            try:
                yield iso
            finally:
                if iso._sampler is not None:
                    iso._sampler.cancel()
    except BaseException:
        with contextlib.suppress(BaseException):  # the body's exception is the one to report
            await asyncio.shield(asyncio.ensure_future(iso._close()))
        raise
    problems = await asyncio.shield(asyncio.ensure_future(iso._close()))
    if problems:
        raise SandboxError("; ".join(problems))
