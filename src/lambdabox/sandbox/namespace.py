"""Owns an environment's namespaces: the mount namespace (/var/task, /opt, /tmp, /etc/hosts, /etc/resolv.conf)
and the network namespace (``lo``, up), made by a short-lived thread of lambdabox's own with system calls and held
by descriptors; the probes that say whether the machine allows them, and the files shown at /etc."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from lambdabox.sandbox import outbound as outbound_module
from lambdabox.sandbox import syscalls

DEADLINE_S = 5.0
"""Bound on every wait: namespaces made, FROZEN/THAWED, cgroup empty."""
HOSTS_LINE = "127.0.0.1\tsandbox sandbox.localdomain\n"
_MOUNTPOINTS = ("/var/task", "/opt")
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


@dataclass(frozen=True)
class Layout:
    task: Path  # appears at /var/task (read-only, as in Lambda)
    opt: Path  # appears at /opt (read-only, as in Lambda)
    tmp: Path  # appears at /tmp (private to the environment, kept across resets)
    keep: Sequence[Path] = ()  # host paths that stay visible inside at the same path (under /tmp or /opt)


def _under(path: str, top: str) -> str | None:
    """``path`` relative to ``top`` when it lies strictly under it."""
    return path[len(top) + 1 :] if path.startswith(top + "/") else None


def _enter_and_mount(layout: Layout, etc: Path, net: bool, mounted: Sequence[str]) -> tuple[int, int | None]:
    """On the calling thread (a thread of its own, which ends after): new mount (and, given ``net``, network)
    namespaces, ``lo`` up, the layout mounted, and the files in ``etc`` over /etc's; descriptors holding the
    namespaces (mount, network)."""
    task, opt, tmp = (str(p.resolve()) for p in (layout.task, layout.opt, layout.tmp))
    # (path, is a dir), seen from the host before anything covers them
    keep = sorted((path, os.path.isdir(path)) for path in map(os.path.realpath, layout.keep) if os.path.exists(path))
    syscalls.unshare(syscalls.CLONE_NEWNS | (syscalls.CLONE_NEWNET if net else 0))
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    if net:
        _loopback_up()
    for point in _MOUNTPOINTS:
        _make_mountpoint(point, mounted)
    # The host's /opt and /tmp, to reach kept paths once they are covered.
    host = {top: os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for top in ("/opt", "/tmp")}
    try:
        for name in ("hosts", "resolv.conf"):  # resolv.conf only given an outbound network
            if os.path.exists(etc / name) and os.path.exists(f"/etc/{name}"):
                _bind(str(etc / name), f"/etc/{name}", read_only=True)
        _bind(task, "/var/task", read_only=True)
        for top, source in (("/opt", opt), ("/tmp", tmp)):
            _bind(source, top)
            for path, is_dir in keep:  # each gets an (empty) mountpoint inside the layout's dir
                if (rest := _under(path, top)) is not None:
                    if is_dir:
                        os.makedirs(path, exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        open(path, "ab").close()
                    _bind(f"/proc/self/fd/{host[top]}/{rest}", path)
            if top == "/opt":
                _bind(None, "/opt", read_only=True)
    finally:
        for fd in host.values():
            os.close(fd)
    mnt_fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mnt_fd, (os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC) if net else None)
    except OSError:
        os.close(mnt_fd)
        raise


def _bind(source: str | None, target: str, *, read_only: bool = False) -> None:
    """Bind ``source`` at ``target`` (None: only the read-only remount of what is there), as ``mount --bind``."""
    if source is not None:
        syscalls.mount(source, target, None, syscalls.MS_BIND)
    if read_only:  # a bind mount becomes read-only only by a remount; its other flags are kept
        flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | syscalls.mount_flags(target)
        syscalls.mount(None, target, None, flags)


def _loopback_up() -> None:
    """Bring ``lo`` up in the calling thread's network namespace (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _make_mountpoint(point: str, mounted: Sequence[str]) -> None:
    """Make ``point`` exist in this namespace. Where its parent has nothing mounted below it, a private overlay
    (upper layer on a tmpfs) over the parent adds it, so the host's directory stays untouched. Otherwise (no
    overlay, or a parent like / that cannot be overlaid) an empty directory on the host's filesystem, made only
    where nothing exists; no existing content is touched."""
    parent = os.path.dirname(point)
    if os.path.isdir(point):
        return
    if parent != "/" and os.path.isdir(parent) and not any(_under(m, parent) for m in mounted):
        lower = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        done = 0  # mounts to undo if a later step fails
        try:
            syscalls.mount("lambdabox", parent, "tmpfs", 0, "mode=755")
            done = 1
            upper, work = f"{parent}/.u", f"{parent}/.w"
            os.mkdir(upper)
            os.mkdir(work)
            options = f"lowerdir=/proc/self/fd/{lower},upperdir={upper},workdir={work}"
            syscalls.mount("lambdabox", parent, "overlay", 0, options)
            done = 2
            os.mkdir(point)
        except OSError:
            for _ in range(done):
                syscalls.umount(parent)
        finally:
            os.close(lower)
    os.makedirs(point, exist_ok=True)


def _probe_namespace() -> str | None:
    """None if a mount namespace can be tried here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("nsenter", "sh"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not os.path.exists("/proc/thread-self/ns/mnt"):
        return "the kernel has no mount namespaces"
    links = [p for p in (*_MOUNTPOINTS, "/etc/hosts", "/tmp") if os.path.islink(p)]
    return f"{links[0]} is a symbolic link" if links else None


def _write_etc(etc: Path, host: str | None, resolver: str | None) -> None:
    """``hosts``: the host's /etc/hosts plus Lambda's sandbox names, and the machine's own names at ``host``;
    given ``resolver``, ``resolv.conf``: the host's, with ``resolver`` as the only nameserver."""
    entries = _read_or("/etc/hosts", "127.0.0.1\tlocalhost\n").rstrip("\n") + "\n" + HOSTS_LINE
    if host is not None:
        entries += f"{host}\t{' '.join(outbound_module.HOST_NAMES)}\n"
    (etc / "hosts").write_text(entries)
    if resolver is None:
        (etc / "resolv.conf").unlink(missing_ok=True)
    else:
        kept = [line for line in _read_or("/etc/resolv.conf", "").splitlines() if not line.startswith("nameserver")]
        (etc / "resolv.conf").write_text("\n".join([*kept, f"nameserver {resolver}", ""]))


def _read_or(path: str, default: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return default


class Namespace:
    """One environment's mount namespace (and network namespace, where one can be had), held by descriptors of
    lambdabox's own: no process holds them, and they go when the descriptors are closed and the environment's
    processes are gone."""

    def __init__(self, layout: Layout, *, network: bool = True) -> None:
        self.layout = layout
        self.network = network  # False: no network namespace even where one could be had
        self.net_why: str | None = None  # why there is no network namespace
        self.nsenter = "nsenter"
        self.files_dir: Path | None = None  # lambdabox's own files for the environment (/etc's, logs)
        self._mnt_fd: int | None = None
        self._net_fd: int | None = None

    @property
    def active(self) -> bool:
        """Whether the environment has its mount namespace."""
        return self._mnt_fd is not None

    @property
    def mnt_path(self) -> str | None:
        """A path that opens the mount namespace (for ``nsenter --mount=``), None without one."""
        return None if self._mnt_fd is None else f"/proc/{os.getpid()}/fd/{self._mnt_fd}"

    @property
    def net_path(self) -> str | None:
        """A path that opens the network namespace, None without one."""
        return None if self._net_fd is None else f"/proc/{os.getpid()}/fd/{self._net_fd}"

    def path(self, lambda_path: str) -> str:
        if self.active:
            return lambda_path
        for top, host in (("/var/task", self.layout.task), ("/opt", self.layout.opt), ("/tmp", self.layout.tmp)):
            if lambda_path == top:
                return str(host)
            if (rest := _under(lambda_path, top)) is not None:
                return str(host / rest)
        return lambda_path

    async def start(self, *, outbound: bool = False) -> str | None:
        """Make the namespaces, with a network namespace when it can be had (else ``net_why`` says why not); None,
        or why there can be no mount namespace. ``outbound``: the network namespace is to get its outbound
        interface (``outbound.Outbound``), so its /etc names the host and the resolver on that interface."""
        if (why := _probe_namespace()) is not None:
            self.net_why = why
            return why
        self.nsenter = shutil.which("nsenter") or "nsenter"
        self.files_dir = files = Path(tempfile.mkdtemp(prefix="lambdabox-env-"))
        self.net_why = None if self.network else "network=False"
        if self.net_why is None:
            address = outbound_module.HOST_ADDRESS if outbound else None
            _write_etc(files, address, outbound_module.DNS_ADDRESS if outbound else None)
            if (why := await self._make(files, net=True)) is None:
                return None
            self.net_why = why  # try again without one
        _write_etc(files, "127.0.0.1", None)  # the host's network: the machine is at its own loopback
        why = await self._make(files, net=False)
        if why is not None:
            self.net_why = why
        return why

    async def _make(self, etc: Path, *, net: bool) -> str | None:
        """Make the namespaces on a thread of their own (a network one given ``net``); None, or why it failed."""
        with open("/proc/self/mountinfo") as f:  # noqa: ASYNC230 (procfs, never blocks)
            mounted = [line.split()[4] for line in f]
        made: Future[tuple[int, int | None]] = Future()

        def make() -> None:
            try:
                made.set_result(_enter_and_mount(self.layout, etc, net, mounted))
            except BaseException as e:
                made.set_exception(e)

        threading.Thread(target=make, name="lambdabox-namespace", daemon=True).start()
        try:
            mnt_fd, self._net_fd = await asyncio.wait_for(asyncio.wrap_future(made), DEADLINE_S)
        except TimeoutError:
            made.add_done_callback(_close_made)  # should it ever finish
            return f"namespace setup failed: not done after {DEADLINE_S}s"
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            return f"namespace setup failed: {e.strerror or e}{where}"
        self._mnt_fd = mnt_fd
        return None

    def close(self) -> None:
        """Close the descriptors that hold the namespaces (idempotent)."""
        for fd in (self._mnt_fd, self._net_fd):
            if fd is not None:
                os.close(fd)
        self._mnt_fd = self._net_fd = None


def _close_made(made: Future[tuple[int, int | None]]) -> None:
    if made.exception() is None:
        for fd in made.result():
            if fd is not None:
                os.close(fd)
