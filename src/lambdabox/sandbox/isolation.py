"""Owns an environment's isolation: its mount namespace (/var/task, /opt, /tmp, /etc/hosts) and its
cgroups (memory limit, peak memory, OOM kills, freezer), or the degraded stand-ins where the machine
cannot give them; ``degraded`` says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import shlex
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from lambdabox.core.errors import SandboxError

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEADLINE_S = 5.0
"""Bound on every wait: holder ready, FROZEN/THAWED, cgroup empty, holder exit."""
SAMPLE_EVERY_S = 0.01
HOSTS_LINE = "127.0.0.1\tsandbox sandbox.localdomain\n"
_MOUNTPOINTS = ("/var/task", "/opt")


@dataclass(frozen=True)
class Layout:
    task: Path  # appears at /var/task (read-only, as in Lambda)
    opt: Path  # appears at /opt (read-only, as in Lambda)
    tmp: Path  # appears at /tmp (private to the environment, kept across resets)
    keep: Sequence[Path] = ()  # host paths that stay visible inside at the same path (under /tmp or /opt)


def _under(path: str, top: str) -> str | None:
    """``path`` relative to ``top`` when it lies strictly under it."""
    return path[len(top) + 1 :] if path.startswith(top + "/") else None


def _has_submounts(parent: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(_under(line.split()[4], parent) is not None for line in f)


def _holder_script(layout: Layout, hosts: Path) -> str:
    """The shell script the namespace's holder runs: mounts, then `ready`, then wait for stdin EOF."""
    q = shlex.quote
    task, opt, tmp = (str(p.resolve()) for p in (layout.task, layout.opt, layout.tmp))
    keep = sorted(os.path.realpath(p) for p in layout.keep if os.path.exists(p))
    lines = ["set -e", "exec 3</tmp"]  # the host's /tmp, to reach kept paths once it is covered
    for point in _MOUNTPOINTS:
        if os.path.isdir(point):
            continue
        parent = os.path.dirname(point)
        if parent != "/" and os.path.isdir(parent) and not _has_submounts(parent):
            # Make the mountpoint in this namespace only: a private overlay (upper layer on a
            # tmpfs) over its parent, so the host's directory stays untouched.
            # n counts what got mounted, to undo it if a later step fails.
            up, work = q(parent + "/.u"), q(parent + "/.w")
            lines.append(
                f"n=0; {{ exec 5<{q(parent)} && mount -t tmpfs -o mode=755 lambdabox {q(parent)} && n=1"
                f" && mkdir {up} {work} && mount -t overlay -o lowerdir=/proc/self/fd/5,upperdir={up},"
                f"workdir={work} lambdabox {q(parent)} && n=2 && mkdir {q(point)}; }}"
                f' || while [ "$n" -gt 0 ]; do umount {q(parent)}; n=$((n - 1)); done; exec 5<&-'
            )
        # Fallback (no overlay, or a parent like / that cannot be overlaid): an empty directory on
        # the host's filesystem, only when nothing is there; no existing content is touched.
        lines.append(f"[ -d {q(point)} ] || mkdir -p {q(point)}")
    lines += [
        "exec 4</opt",  # the host's /opt, likewise
        f"mount -c -o bind,ro {q(str(hosts))} /etc/hosts",
        f"mount -c -o bind,ro {q(task)} /var/task",
        f"mount -c --bind {q(opt)} /opt",
    ]
    # Mountpoints for kept paths are made inside the layout's opt and tmp dirs (empty dirs).
    for top, fd in (("/opt", 4), ("/tmp", 3)):
        if top == "/tmp":
            lines.append(f"mount -c --bind {q(tmp)} /tmp")
        for path in keep:
            rest = _under(path, top)
            if rest is None:
                continue
            if os.path.isdir(path):
                lines.append(f"mkdir -p {q(path)}")
            else:
                lines.append(f"mkdir -p {q(os.path.dirname(path))} && : >> {q(path)}")
            lines.append(f"mount -c --bind /proc/self/fd/{fd}/{q(rest)} {q(path)}")
        if top == "/opt":
            lines.append("mount -c -o remount,bind,ro /opt")
    lines += ["exec 3<&- 4<&-", "echo ready", "exec cat >/dev/null"]  # holds until stdin closes
    return "\n".join(lines)


def _probe_namespace() -> str | None:
    """None if a mount namespace can be tried here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("unshare", "nsenter", "mount", "sh", "cat"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not os.path.exists("/proc/self/ns/mnt"):
        return "the kernel has no mount namespaces"
    for point in (*_MOUNTPOINTS, "/etc/hosts", "/tmp"):
        if os.path.islink(point):
            return f"{point} is a symbolic link"
    return None


def _write_hosts() -> Path:
    """The host's /etc/hosts plus Lambda's sandbox names, in a new private dir."""
    hosts = Path(tempfile.mkdtemp(prefix="lambdabox-hosts-")) / "hosts"
    try:
        entries = Path("/etc/hosts").read_text()
    except OSError:
        entries = "127.0.0.1\tlocalhost\n"
    hosts.write_text(entries.rstrip("\n") + "\n" + HOSTS_LINE)
    return hosts


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

    def __init__(self, layout: Layout, memory_mb: int) -> None:
        self.layout = layout
        self.memory_mb = memory_mb
        self.degraded: tuple[str, ...] = ()
        self._holder: asyncio.subprocess.Process | None = None
        self._hosts_dir: Path | None = None
        self._memory: Path | None = None
        self._freezer: Path | None = None
        self._registered: set[int] = set()
        self._stopped: set[int] = set()  # SIGSTOPped by a degraded freeze
        self._frozen = False
        self._peak = 0
        self._sampler: asyncio.Task[None] | None = None
        self._nsenter = "nsenter"

    # ---- spawning ---------------------------------------------------------------------------------

    def command(self, argv: Sequence[str], *, cwd: str = "/var/task") -> list[str]:
        """The argv to spawn so that the process (and every child it makes) runs in the environment.

        Enters the namespace, joins the cgroups and changes to ``cwd``, all before ``argv`` is exec'd.
        Spawn it with ``host_cwd(cwd)`` as the working directory.
        """
        steps = [f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}" for cg in self._cgroups()]
        prefix: list[str] = []
        if self._holder is not None:  # (nsenter --wd opens its directory before entering)
            prefix = [self._nsenter, f"--mount=/proc/{self._holder.pid}/ns/mnt", "--"]
            steps.append(f"cd {shlex.quote(cwd)}")
        if steps:
            prefix += ["/bin/sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh"]
        return [*prefix, *argv]

    def host_cwd(self, cwd: str = "/var/task") -> str:
        """Working directory to hand the spawner along with ``command(argv, cwd=cwd)``."""
        return "/" if self._holder is not None else self.path(cwd)

    def path(self, lambda_path: str) -> str:
        """The path to use for a Lambda path: itself inside the namespace, else the host dir behind it."""
        if self._holder is not None:
            return lambda_path
        for top, host in (("/var/task", self.layout.task), ("/opt", self.layout.opt), ("/tmp", self.layout.tmp)):
            if lambda_path == top:
                return str(host)
            rest = _under(lambda_path, top)
            if rest is not None:
                return str(host / rest)
        return lambda_path

    def _cgroups(self) -> tuple[Path, ...]:
        return (self._memory, self._freezer) if self._memory and self._freezer else ()

    def register(self, pid: int) -> None:
        """Track a process started with ``command()`` (needed in degraded mode, harmless otherwise)."""
        self._registered.add(pid)

    # ---- accounting and control --------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every live process of the environment."""
        if cgroups := self._cgroups():
            return sorted(set().union(*(_read_pids(cg) for cg in cgroups)))
        found: set[int] = set()
        for pid in list(self._registered):
            try:
                root = psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._registered.discard(pid)
                continue
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        found.add(proc.pid)
        return sorted(found)

    def peak_memory_bytes(self) -> int:
        """Peak memory of all the environment's processes together since it was made."""
        if self._memory is not None:
            return int((self._memory / "memory.max_usage_in_bytes").read_text())
        if not self._frozen:
            self._sample()
        return self._peak

    def oom_kill_count(self) -> int:
        """OOM kills in the cgroup (or, on kernels without that counter, times the limit was hit)."""
        if self._memory is None:
            return 0
        for line in (self._memory / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return int((self._memory / "memory.failcnt").read_text())

    def oom_killed(self) -> bool:
        """Whether the kernel killed something for the memory limit."""
        return self.oom_kill_count() > 0

    async def freeze(self) -> None:
        if self._freezer is not None:
            await self._set_freezer("FROZEN")
            return
        self._frozen = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while new := [p for p in self.pids() if p not in self._stopped]:  # repeat: they may fork
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                self._stopped.add(pid)
            if loop.time() > deadline:
                raise SandboxError("freeze: processes keep appearing")
        await _poll(lambda: all(_stopped_or_gone(p) for p in self._stopped), "freeze (SIGSTOP)")

    async def thaw(self) -> None:
        if self._freezer is not None:
            await self._set_freezer("THAWED")
            return
        for pid in self._stopped | set(self.pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._stopped.clear()
        self._frozen = False

    async def kill_all(self) -> None:
        """SIGKILL everything in the environment and wait (bounded) until none is left."""
        frozen = False
        if self._freezer is not None:  # freeze first so nothing forks between listing and killing
            with contextlib.suppress(SandboxError, OSError):
                await self._set_freezer("FROZEN")
                frozen = True
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._freezer is not None:
            await self._set_freezer("THAWED")  # frozen tasks die only once thawed
        else:
            self._stopped.clear()
            self._frozen = False

        def empty() -> bool:
            left = self.pids()
            for pid in left:  # late forks
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not left

        await _poll(empty, f"kill_all (frozen first: {frozen})")

    async def _set_freezer(self, state: str) -> None:
        assert self._freezer is not None
        path = self._freezer / "freezer.state"
        path.write_text(state)
        await _poll(lambda: path.read_text().strip() == state, f"freezer {state}")

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

    # ---- setup and teardown --------------------------------------------------------------------------

    def _make_cgroups(self, name: str) -> str | None:
        """Create the memory and freezer cgroups; None, or why they cannot be had."""
        if os.geteuid() != 0:
            return "not root"
        if not (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
            return f"no cgroup v1 memory controller at {CGROUP_ROOT / 'memory'}"
        if not (CGROUP_ROOT / "freezer" / "cgroup.procs").exists():
            return f"no cgroup v1 freezer controller at {CGROUP_ROOT / 'freezer'}"
        leaf = f"lambdabox-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}-{secrets.token_hex(4)}"
        try:
            memory = CGROUP_ROOT / "memory" / leaf
            memory.mkdir()
            self._memory = memory
            limit = self.memory_mb * 1024 * 1024
            (memory / "memory.limit_in_bytes").write_text(str(limit))
            if int((memory / "memory.limit_in_bytes").read_text()) != limit:
                raise OSError(f"memory.limit_in_bytes did not take {limit}")
            with contextlib.suppress(OSError):  # swap accounting may be off: then there is no memsw file
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
            freezer = CGROUP_ROOT / "freezer" / leaf
            freezer.mkdir()
            self._freezer = freezer
            if not (freezer / "freezer.state").exists():
                raise OSError(f"{freezer} has no freezer.state")
        except OSError as e:
            for cg in (self._memory, self._freezer):
                if cg is not None:
                    with contextlib.suppress(OSError):
                        cg.rmdir()
            self._memory = self._freezer = None
            return f"cannot set up cgroups: {e}"
        return None

    async def _start_holder(self) -> str | None:
        """Start the namespace's holder; None, or why there can be no mount namespace."""
        why = _probe_namespace()
        if why is not None:
            return why
        self._nsenter = shutil.which("nsenter") or "nsenter"
        hosts = _write_hosts()
        self._hosts_dir = hosts.parent
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _holder_script(self.layout, hosts)]
        self._holder = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self._holder.stdout is not None and self._holder.stderr is not None
        line = b""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(self._holder.stdout.readline(), DEADLINE_S)
        if line == b"ready\n":
            return None
        err = b""
        with contextlib.suppress(TimeoutError):
            err = await asyncio.wait_for(self._holder.stderr.read(4096), 0.5)
        await self._stop_holder()
        return f"namespace setup failed: {err.decode(errors='replace').strip() or 'no ready signal'}"

    async def _stop_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            await asyncio.wait_for(holder.wait(), DEADLINE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                holder.kill()
            await asyncio.wait_for(holder.wait(), DEADLINE_S)

    async def _open(self, name: str, isolate: bool) -> None:
        for what in ("task", "opt", "tmp"):
            if not os.path.isdir(path := getattr(self.layout, what)):  # noqa: ASYNC240 (a stat)
                raise SandboxError(f"layout.{what} {path} is not a directory")
        cg_why = self._make_cgroups(name) if isolate else "isolate=False"
        ns_why = await self._start_holder() if isolate else "isolate=False"
        found: list[str] = []
        if ns_why is not None:
            found += [
                f"no mount namespace ({ns_why}): code is at {self.layout.task}, not /var/task",
                f"layers are at {self.layout.opt}, not /opt; tmp is {self.layout.tmp}, not /tmp",
                "code and layers are writable (read-only in Lambda)",
                "/etc/hosts unchanged: sandbox.localdomain may not resolve",
            ]
        if cg_why is not None:
            found += [
                f"no memory limit ({cg_why}): MemorySize is not enforced and OOM kills are not seen",
                f"peak memory is sampled every {SAMPLE_EVERY_S * 1000:.0f} ms, not counted by the kernel",
                "freezing sends SIGSTOP/SIGCONT to the registered processes' trees, not the cgroup freezer",
            ]
            self._sampler = asyncio.create_task(self._sample_forever(), name="lambdabox-memory-sampler")
        self.degraded = tuple(found)

    async def _close(self) -> list[str]:
        """Release everything (each step runs even if an earlier one fails); the problems met."""
        problems: list[str] = []
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        try:
            await self.kill_all()
        except (SandboxError, OSError) as e:
            problems.append(str(e))
        for cg in (self._memory, self._freezer):
            if cg is None:
                continue
            try:
                await _poll(functools.partial(_try_rmdir, cg), f"rmdir {cg}")
            except SandboxError as e:
                problems.append(str(e))
        self._memory = self._freezer = None
        try:
            await self._stop_holder()
        except (TimeoutError, OSError) as e:
            problems.append(f"namespace holder did not stop: {e!r}")
        if self._hosts_dir is not None:
            shutil.rmtree(self._hosts_dir, ignore_errors=True)
            self._hosts_dir = None
        return problems


def _read_pids(cgroup: Path) -> set[int]:
    try:
        return {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY while the last tasks exit
        return False
    return True


def _stopped_or_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@asynccontextmanager
async def open_isolation(
    layout: Layout, *, memory_mb: int, name: str, isolate: bool = True
) -> AsyncIterator[Isolation]:
    """An environment's isolation for the life of the block; torn down even on error or cancel."""
    iso = Isolation(layout, memory_mb)
    try:
        await iso._open(name, isolate)
        yield iso
    except BaseException:
        with contextlib.suppress(BaseException):
            await asyncio.shield(asyncio.ensure_future(iso._close()))
        raise
    problems = await asyncio.shield(asyncio.ensure_future(iso._close()))
    if problems:
        raise SandboxError("; ".join(problems))
