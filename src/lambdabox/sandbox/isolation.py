"""Owns an environment's isolation: its mount namespace (/var/task, /opt, /tmp, /etc/hosts), its network
namespace (only ``lo``, up), and its cgroups (memory limit, peak memory, OOM kills, freezer), or the degraded
stand-ins where the machine cannot give them; ``degraded`` says which.
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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
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


def _holder_script(layout: Layout, hosts: Path, ip: str | None = None) -> str:
    """The shell script the namespaces' holder runs: ``lo`` up (given ``ip``, in a new network namespace), mounts,
    then `ready`, then wait for stdin EOF."""
    q = shlex.quote
    task, opt, tmp = (str(p.resolve()) for p in (layout.task, layout.opt, layout.tmp))
    keep = sorted(os.path.realpath(p) for p in layout.keep if os.path.exists(p))
    lines = ["set -e", "exec 3</tmp"]  # the host's /tmp, to reach kept paths once it is covered
    if ip is not None:
        lines.append(f"{q(ip)} link set lo up")
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f]
    for point in _MOUNTPOINTS:
        parent = os.path.dirname(point)
        if os.path.isdir(point):
            continue
        if parent != "/" and os.path.isdir(parent) and not any(_under(m, parent) for m in mounted):
            # Make the mountpoint in this namespace only: a private overlay (upper layer on a tmpfs)
            # over its parent, so the host's directory stays untouched. n counts mounts to undo.
            up, work = q(parent + "/.u"), q(parent + "/.w")
            lines.append(
                f"n=0; {{ exec 5<{q(parent)} && mount -t tmpfs -o mode=755 lambdabox {q(parent)} && n=1"
                f" && mkdir {up} {work} && mount -t overlay -o lowerdir=/proc/self/fd/5,upperdir={up},"
                f"workdir={work} lambdabox {q(parent)} && n=2 && mkdir {q(point)}; }}"
                f' || while [ "$n" -gt 0 ]; do umount {q(parent)}; n=$((n - 1)); done; exec 5<&-'
            )
        # Fallback (no overlay, or a parent like / that cannot be overlaid): an empty directory on the
        # host's filesystem, made only where nothing exists; no existing content is touched.
        lines.append(f"[ -d {q(point)} ] || mkdir -p {q(point)}")
    lines += [
        "exec 4</opt",  # the host's /opt, likewise
        f"mount -c -o bind,ro {q(str(hosts))} /etc/hosts",
        f"mount -c -o bind,ro {q(task)} /var/task",
        f"mount -c --bind {q(opt)} /opt",
    ]
    # Kept paths get (empty) mountpoints inside the layout's opt and tmp dirs.
    for top, fd in (("/opt", 4), ("/tmp", 3)):
        if top == "/tmp":
            lines.append(f"mount -c --bind {q(tmp)} /tmp")
        for path in keep:
            if (rest := _under(path, top)) is not None:
                made = q(path) if os.path.isdir(path) else f"{q(os.path.dirname(path))} && : >> {q(path)}"
                lines.append(f"mkdir -p {made} && mount -c --bind /proc/self/fd/{fd}/{q(rest)} {q(path)}")
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
    links = [p for p in (*_MOUNTPOINTS, "/etc/hosts", "/tmp") if os.path.islink(p)]
    return f"{links[0]} is a symbolic link" if links else None


def _probe_network() -> str | None:
    """None if a network namespace can be tried here (given a mount namespace), else why not."""
    if shutil.which("ip") is None:
        return "ip not found (install iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "the kernel has no network namespaces"
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

    def __init__(self, layout: Layout, memory_mb: int, *, network: bool = True) -> None:
        self.layout = layout
        self.memory_mb = memory_mb
        self.network = network  # False: no network namespace even where one could be had
        self.api_port: int | None = None  # without a network namespace: the Runtime API's port (for ``degraded``)
        self._found: tuple[str, ...] = ()
        self._net_why: str | None = None  # why there is no network namespace
        self._holder: asyncio.subprocess.Process | None = None
        self._nsenter = "nsenter"
        self._hosts_dir: Path | None = None
        self._memory: Path | None = None
        self._freezer: Path | None = None
        self._registered: set[int] = set()
        self._stopped: set[int] = set()  # SIGSTOPped by a degraded freeze
        self._frozen = False
        self._peak_fd: int | None = None
        self._freezer_fd: int | None = None
        self._peak = 0
        self._sampler: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> tuple[str, ...]:
        """What differs from Lambda here, one sentence each; empty when nothing does."""
        if self._net_why is None:
            return self._found
        at = f"127.0.0.1:{self.api_port}" if self.api_port is not None else "a port of its own on 127.0.0.1"
        return (
            *self._found,
            f"no network namespace ({self._net_why}): the Runtime API is at {at}, not 127.0.0.1:9001, "
            "and extensions share the host's ports",
        )

    @property
    def net_namespace(self) -> str | None:
        """The environment's network namespace (a path to open, as ``/proc/<pid>/ns/net``), None without one."""
        if self._holder is None or self._net_why is not None:
            return None
        return f"/proc/{self._holder.pid}/ns/net"

    def command(self, argv: Sequence[str], *, cwd: str = "/var/task") -> list[str]:
        """The argv to spawn so that the process (and every child it makes) runs in the environment.

        Enters the namespace, joins the cgroups and changes to ``cwd``, all before ``argv`` is exec'd.
        Spawn it with ``host_cwd(cwd)`` as the working directory.
        """
        steps = [f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}" for cg in self._cgroups()]
        prefix: list[str] = []
        if self._holder is not None:  # (not nsenter --wd: it opens the directory before entering)
            prefix = [self._nsenter, f"--mount=/proc/{self._holder.pid}/ns/mnt"]
            if (net := self.net_namespace) is not None:
                prefix.append(f"--net={net}")
            prefix.append("--")
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
            if (rest := _under(lambda_path, top)) is not None:
                return str(host / rest)
        return lambda_path

    def register(self, pid: int) -> None:
        """Track a process started with ``command()`` (needed in degraded mode, harmless otherwise)."""
        self._registered.add(pid)

    def _cgroups(self) -> tuple[Path, ...]:
        # Freezer first: then whatever the memory cgroup counts can also be frozen.
        return (self._freezer, self._memory) if self._memory and self._freezer else ()

    def pids(self) -> list[int]:
        """Every live process of the environment."""
        if cgroups := self._cgroups():
            return sorted(set().union(*(_read_pids(cg) for cg in cgroups)))
        found: set[int] = set()
        for pid in list(self._registered):
            tree = _tree(pid)
            if not tree:
                self._registered.discard(pid)
            found.update(p for p in tree if _status(p) not in ("Z", None))
        return sorted(found)

    def peak_memory_bytes(self) -> int:
        """Peak memory of all the environment's processes together since it was made."""
        if self._memory is not None:
            if self._peak_fd is None:  # read once per invoke: an open descriptor and pread keep it cheap
                self._peak_fd = os.open(self._memory / "memory.max_usage_in_bytes", os.O_RDONLY)
            return int(os.pread(self._peak_fd, 32, 0))
        if not self._frozen:
            self._sample()
        return self._peak

    def oom_kill_count(self) -> int:
        """OOM kills in the cgroup (or, on kernels without that counter, times the limit was hit)."""
        if self._memory is None:
            return 0
        for line in (self._memory / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return int((self._memory / "memory.failcnt").read_text())

    def oom_killed(self) -> bool:
        """Whether the kernel killed something for the memory limit."""
        return self.oom_kill_count() > 0

    async def freeze(self, *, wait: bool = False) -> None:
        """Freeze every process of the environment (cgroup freezer, else SIGSTOP).

        Unless ``wait``, nothing waits for the processes to stop (``freeze_at_once``); with ``wait``, a bounded
        wait until every one has."""
        if not wait:
            return self.freeze_at_once()
        if self._freezer is not None:
            return await self._set_freezer("FROZEN")
        self._frozen = True

        def all_stopped() -> bool:  # list again each time: they may have forked meanwhile
            self._stopped.update(_kill(signal.SIGSTOP, [p for p in self.pids() if p not in self._stopped]))
            return all(_status(p) in ("T", "Z", None) for p in self._stopped)

        await _poll(all_stopped, "freeze (SIGSTOP)")

    def freeze_at_once(self) -> None:
        """Start freezing every process of the environment; nothing waits for them to stop. The cgroup freezer
        completes a freeze on its own (a THAWED written while still FREEZING undoes it); without it, SIGSTOP is
        sent to each process (a SIGCONT sent before it takes effect undoes it), so the next invoke's thaw is
        never held behind a freeze."""
        if self._freezer is not None:
            self._write_freezer("FROZEN")
            return
        self._frozen = True
        self._stopped.update(_kill(signal.SIGSTOP, self.pids()))

    def thaw(self) -> None:
        if self._freezer is not None:
            self._write_freezer("THAWED")  # the kernel thaws the cgroup before the write returns
            return
        _kill(signal.SIGCONT, self._stopped | set(self.pids()))
        self._stopped.clear()
        self._frozen = False

    async def kill_all(self) -> None:
        """SIGKILL everything in the environment and wait (bounded) until none is left.

        A process whose ``command()`` prefix has not joined the cgroups yet is not seen here (the
        teardown catches it); do not spawn while this runs.
        """
        if self._freezer is not None:  # frozen first, so that nothing forks between listing and killing
            with contextlib.suppress(SandboxError, OSError):
                await self._set_freezer("FROZEN")
        _kill(signal.SIGKILL, self.pids())
        if self._freezer is not None:
            await self._set_freezer("THAWED")  # frozen tasks die only once thawed
        self._stopped.clear()
        self._frozen = False
        await _poll(lambda: not _kill(signal.SIGKILL, self.pids()), "kill_all")  # late forks too

    async def _set_freezer(self, state: str) -> None:
        assert self._freezer is not None
        self._write_freezer(state)
        path = self._freezer / "freezer.state"
        await _poll(lambda: path.read_text().strip() == state, f"freezer {state}")

    def _write_freezer(self, state: str) -> None:
        assert self._freezer is not None
        if self._freezer_fd is None:  # written twice per invoke: kept open
            self._freezer_fd = os.open(self._freezer / "freezer.state", os.O_WRONLY)
        os.write(self._freezer_fd, state.encode())

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

    def _make_cgroups(self, name: str) -> str | None:
        """Create the memory and freezer cgroups; None, or why they cannot be had."""
        if os.geteuid() != 0:
            return "not root"
        for controller, probe in (("memory", "memory.limit_in_bytes"), ("freezer", "cgroup.procs")):
            if not (CGROUP_ROOT / controller / probe).exists():
                return f"no cgroup v1 {controller} controller at {CGROUP_ROOT / controller}"
        leaf = f"lambdabox-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}-{secrets.token_hex(4)}"
        limit = self.memory_mb * 1024 * 1024
        try:
            (memory := CGROUP_ROOT / "memory" / leaf).mkdir()
            self._memory = memory
            (memory / "memory.limit_in_bytes").write_text(str(limit))
            if int((memory / "memory.limit_in_bytes").read_text()) != limit:
                raise OSError(f"memory.limit_in_bytes did not take {limit}")
            with contextlib.suppress(OSError):  # no such file when swap accounting is off
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limit))
            (freezer := CGROUP_ROOT / "freezer" / leaf).mkdir()
            self._freezer = freezer
            if not (freezer / "freezer.state").exists():
                raise OSError(f"{freezer} has no freezer.state")
        except OSError as e:
            for cg in (c for c in (self._memory, self._freezer) if c is not None):
                with contextlib.suppress(OSError):
                    cg.rmdir()
            self._memory = self._freezer = None
            return f"cannot set up cgroups: {e}"
        return None

    async def _start_holder(self) -> str | None:
        """Start the namespaces' holder, with a network namespace when it can be had (else ``_net_why`` says why
        not); None, or why there can be no mount namespace."""
        if (why := _probe_namespace()) is not None:
            self._net_why = why
            return why
        self._nsenter = shutil.which("nsenter") or "nsenter"
        hosts = _write_hosts()
        self._hosts_dir = hosts.parent
        self._net_why = "network=False" if not self.network else _probe_network()
        if self._net_why is None:
            if (why := await self._spawn_holder(hosts, shutil.which("ip") or "ip")) is None:
                return None
            self._net_why = why  # try again without one
        why = await self._spawn_holder(hosts, None)
        if why is not None:
            self._net_why = why
        return why

    async def _spawn_holder(self, hosts: Path, ip: str | None) -> str | None:
        """Start a holder, in a new network namespace given ``ip``; None, or why it failed."""
        script = _holder_script(self.layout, hosts, ip)
        net = ["--net"] if ip is not None else []
        self._holder = holder = await asyncio.create_subprocess_exec(
            *["unshare", "--mount", *net, "--propagation", "private", "--", "sh", "-c", script],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert holder.stdout is not None and holder.stderr is not None
        line = err = b""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(holder.stdout.readline(), DEADLINE_S)
        if line == b"ready\n":
            return None
        with contextlib.suppress(TimeoutError):
            err = await asyncio.wait_for(holder.stderr.read(4096), 0.5)
        await self._stop_holder()
        return f"namespace setup failed: {err.decode(errors='replace').strip() or 'no ready signal'}"

    async def _stop_holder(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        if holder.stdin is not None:
            holder.stdin.close()  # its `cat` sees EOF and exits
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
        if isolate:
            ns_why = await self._start_holder()
        else:
            ns_why = self._net_why = "isolate=False"
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
        self._found = tuple(found)

    async def _close(self) -> list[str]:
        """Release everything (each step runs even if an earlier one fails); the problems met."""
        problems: list[str] = []
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        try:
            await self.kill_all()
        except (SandboxError, OSError) as e:
            problems.append(str(e))
        for fd in (self._peak_fd, self._freezer_fd):
            if fd is not None:
                os.close(fd)
        self._peak_fd = self._freezer_fd = None
        for cg in self._cgroups():
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


def _read_pids(cgroup: Path) -> set[int]:
    try:
        return {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def _kill(sig: int, pids: Iterable[int]) -> list[int]:
    """Send ``sig`` to each pid (gone ones are skipped); the pids."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _try_rmdir(path: Path) -> bool:
    """Remove a cgroup, killing what is in it (a process spawned just before kill_all joins late)."""
    _kill(signal.SIGKILL, _read_pids(path))
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY while the last tasks exit
        return False
    return True


def _status(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat (R, S, D, T, Z...), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


@asynccontextmanager
async def open_isolation(
    layout: Layout, *, memory_mb: int, name: str, isolate: bool = True, network: bool = True
) -> AsyncIterator[Isolation]:
    """An environment's isolation for the life of the block; torn down even on error or cancel.

    ``network=False`` keeps the environment in the host's network namespace even where it could have its own.
    """
    iso = Isolation(layout, memory_mb, network=network)
    try:
        await iso._open(name, isolate)
        yield iso
    except BaseException:
        with contextlib.suppress(BaseException):  # the body's exception is the one to report
            await asyncio.shield(asyncio.ensure_future(iso._close()))
        raise
    problems = await asyncio.shield(asyncio.ensure_future(iso._close()))
    if problems:
        raise SandboxError("; ".join(problems))
