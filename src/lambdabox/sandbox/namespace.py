"""Owns an environment's namespaces: user, mount, PID and network ones, made and held by the environment's holder
(:mod:`lambdabox.sandbox.held`), with Lambda's filesystem (:mod:`lambdabox.sandbox.rootfs`) and Lambda's user
inside; the probe that says whether the machine allows them, and the files shown at /etc (hosts, resolv.conf,
passwd, group)."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lambdabox.core.errors import SandboxError
from lambdabox.sandbox import leftovers, seccomp
from lambdabox.sandbox import outbound as outbound_module
from lambdabox.sandbox.held import (
    TELEMETRY_TARGET,
    HeldProcess,
    Holder,
    IdMap,
    Spares,
    spawn_holder,
    start_holder,
)
from lambdabox.sandbox.processes import TELEMETRY_FD_ENV

DEADLINE_S = 5.0
"""Bound on every wait: namespaces made, FROZEN/THAWED, cgroup empty."""
HOSTS_LINE = "127.0.0.1\tsandbox sandbox.localdomain\n"
RUNTIME_API_ADDRESS = ("127.0.0.1", 9001)  # where Lambda serves the APIs, inside the environment's namespace
SANDBOX_USER, SANDBOX_UID, SANDBOX_GID = "sbx_user1051", 993, 990
"""Lambda's user for the function and its extensions (``id`` in a Lambda function: uid=993(sbx_user1051) gid=990)."""
PASSWD = (
    f"root:x:0:0:root:/root:/bin/bash\n"
    f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}::/home/{SANDBOX_USER}:/sbin/nologin\n"
)
GROUP = f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\n"


@dataclass(frozen=True)
class Layout:
    task: Path  # appears at /var/task (read-only, as in Lambda)
    opt: Path  # appears at /opt (read-only, as in Lambda)
    tmp: Path  # /tmp where the environment has no namespaces (with them, /tmp is a tmpfs of its own)
    keep: Sequence[Path] = ()  # host paths the processes need: visible inside at the same path (under /tmp and
    # /opt too) and reachable by Lambda's user (the directories on the way it may not enter show only those)
    tmp_mb: int = 512  # the size of /tmp (EphemeralStorage)


def _under(path: str, top: str) -> str | None:
    """``path`` relative to ``top`` when it lies strictly under it."""
    return path[len(top) + 1 :] if path.startswith(top + "/") else None


def _id_map() -> IdMap:
    """Lambda's user inside; outside, lambdabox's own user, or for root the unprivileged ``nobody``."""
    if os.geteuid() != 0:
        return IdMap(SANDBOX_UID, SANDBOX_GID, os.geteuid(), os.getegid())
    try:
        nobody = pwd.getpwnam("nobody")
        return IdMap(SANDBOX_UID, SANDBOX_GID, nobody.pw_uid, nobody.pw_gid)
    except KeyError:
        return IdMap(SANDBOX_UID, SANDBOX_GID, 65534, 65534)


def _blocked(paths: Sequence[str], uid: int, gid: int) -> dict[str, dict[str, str]]:
    """For host ``paths`` the user ``uid``:``gid`` must reach, each directory on the way that it may not traverse,
    with the entries of it that lead to them (directory -> entry -> the entry's host path)."""
    found: dict[str, dict[str, str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(len(parts)):
            directory = "/" + "/".join(parts[:depth])
            if not _traversable(os.stat(directory), uid, gid):
                entry = parts[depth]
                found.setdefault(directory, {})[entry] = os.path.join(directory, entry)
    return found


def _traversable(st: os.stat_result, uid: int, gid: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


@functools.cache
def _seccomp_program() -> bytes:
    """The seccomp filter for this machine, assembled once per process."""
    return seccomp.program()


def _probe_namespace() -> str | None:
    """None if the namespaces can be tried here, else why not."""
    if not os.path.exists("/proc/self/ns/user") or not os.path.exists("/proc/self/ns/pid"):
        return "the kernel has no user or PID namespaces"
    links = [p for p in ("/var/task", "/opt", "/etc/hosts", "/tmp", "/dev") if os.path.islink(p)]
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


def files_dir() -> Path:
    """A new directory for lambdabox's own files of one environment (its /etc files, the holder's log), named after
    this process (so that a later lambdabox removes it if this one dies)."""
    files = Path(tempfile.mkdtemp(prefix=leftovers.temporary_prefix("env")))
    os.chmod(files, 0o711)  # the holder's init, Lambda's user outside, reaches root/ in it (nothing else)
    (files / "root").mkdir(mode=0o755)
    return files


class Namespace:
    """One environment's namespaces, held by its holder: they go when the holder's init ends (and with them every
    process of the environment)."""

    def __init__(self, layout: Layout, *, network: bool = True) -> None:
        self.layout = layout
        self.network = network  # False: no network namespace even where one could be had
        self.net_why: str | None = None  # why there is no network namespace
        self.files_dir: Path | None = None  # lambdabox's own files for the environment (/etc's, logs)
        self.holder: Holder | None = None
        self.listener: socket.socket | None = None  # the Runtime API's, inside, at RUNTIME_API_ADDRESS

    @property
    def active(self) -> bool:
        """Whether the environment has its namespaces."""
        return self.holder is not None

    @property
    def net_path(self) -> str | None:
        """A path that opens the network namespace, None without one."""
        return self.holder.net_path if self.holder is not None and self.net_why is None else None

    def path(self, lambda_path: str) -> str:
        if self.active:
            return lambda_path
        for top, host in (("/var/task", self.layout.task), ("/opt", self.layout.opt), ("/tmp", self.layout.tmp)):
            if lambda_path == top:
                return str(host)
            if (rest := _under(lambda_path, top)) is not None:
                return str(host / rest)
        return lambda_path

    async def start(self, *, outbound: bool, cgroup_procs: Sequence[Path], spares: Spares | None = None) -> str | None:
        """Start the holder (``spares``' if given), its processes joining the cgroups whose ``cgroup.procs`` are
        given; None, or why there can be no namespaces. ``outbound``: the network namespace is to get its outbound
        interface (``outbound.Outbound``), so its /etc names the host and the resolver on that interface."""
        if (why := _probe_namespace()) is not None:
            self.net_why = why
            return why
        try:
            if spares is None:
                self.files_dir = files_dir()  # (removed with the environment, whatever happens next)
                spawned = await spawn_holder(self.files_dir)
            else:
                spawned = await spares.take()
        except OSError as error:
            self.net_why = why = f"namespace setup failed: cannot start the holder: {error}"
            return why
        self.files_dir = files = spawned.files
        ids = _id_map()
        self.net_why = None if self.network else "network=False"
        while True:
            if self.net_why is None:
                address = outbound_module.host_address() if outbound else None
                _write_etc(files, address, outbound_module.dns_address() if outbound else None)
            else:
                _write_etc(files, "127.0.0.1", None)  # the host's network: the machine is at its own loopback
            try:
                config = self._config(files, ids)
                self.holder, fds = await start_holder(config, cgroup_procs, ids, spawned)
                break
            except (SandboxError, OSError) as error:
                why = f"namespace setup failed: {error}"
                if self.net_why is not None:
                    self.net_why = why
                    return why
                self.net_why = why  # try again without a network namespace, with a new holder
                try:
                    spawned = await spawn_holder(files)
                except OSError as again:
                    self.net_why = f"{why}; then {again}"
                    return self.net_why
        if fds:
            self.listener = socket.socket(fileno=fds[0])
            self.listener.setblocking(False)
        return None

    def _config(self, files: Path, ids: IdMap) -> dict[str, object]:
        """The holder's configuration (see :mod:`lambdabox.sandbox.holder`)."""
        sources: list[str] = []  # host paths, opened by the holder before it becomes Lambda's user

        def source(path: str) -> int:
            sources.append(path)
            return len(sources) - 1

        (files / "passwd").write_text(PASSWD)
        (files / "group").write_text(GROUP)
        binds: list[tuple[str, str]] = [(str(self.layout.task), "/var/task"), (str(self.layout.opt), "/opt")]
        binds += [(str(files / name), f"/etc/{name}") for name in ("hosts", "passwd", "group")]
        if (files / "resolv.conf").exists() and os.path.exists("/etc/resolv.conf"):
            binds.append((str(files / "resolv.conf"), "/etc/resolv.conf"))
        if (bash := shutil.which("bash")) is not None:  # /bin/sh is bash, as on Amazon Linux
            binds.append((bash, os.path.realpath("/bin/sh")))
        kept = sorted({os.path.realpath(p) for p in self.layout.keep if os.path.exists(p)})
        binds += [(path, path) for path in kept if _under(path, "/opt") is not None]
        elsewhere = [path for path in kept if _under(path, "/opt") is None and _under(path, "/tmp") is None]
        reach = _blocked(elsewhere, ids.outer_uid, ids.outer_gid) if os.geteuid() == 0 else {}
        return {
            "net": self.net_why is None,
            "uid": ids.uid,
            "gid": ids.gid,
            "api": list(RUNTIME_API_ADDRESS) if self.net_why is None else None,
            "seccomp": _seccomp_program(),
            "sources": sources,
            "fs": {
                "root": str(files / "root"),
                "reach": [
                    [directory, [[name, source(path), os.path.isdir(path)] for name, path in sorted(entries.items())]]
                    for directory, entries in sorted(reach.items())
                ],
                "binds": [[source(host), target, True, os.path.isdir(host)] for host, target in binds],
                "tmp_mb": self.layout.tmp_mb,
                "tmp_keep": [
                    [source(path), path, os.path.isdir(path)] for path in kept if _under(path, "/tmp") is not None
                ],
            },
        }

    async def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        stdout: int,
        stderr: int,
        telemetry: int | None,
        *,
        ahead: bool = False,
    ) -> HeldProcess:
        """Start ``argv`` in the environment through its holder, its output on the descriptors given (awslambdaric's
        telemetry pipe at TELEMETRY_TARGET, which _LAMBDA_TELEMETRY_LOG_FD then names); ``ahead``: see
        :meth:`lambdabox.sandbox.held.Holder.spawn`."""
        assert self.holder is not None
        fds = {1: stdout, 2: stderr}
        if telemetry is not None:
            fds[TELEMETRY_TARGET] = telemetry
            env = {**env, TELEMETRY_FD_ENV: str(TELEMETRY_TARGET)}
        return await self.holder.spawn(argv, env, cwd, fds, ahead=ahead)

    async def close(self) -> None:
        """End the holder (and so the namespaces and everything in them); idempotent."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        holder, self.holder = self.holder, None
        if holder is not None:
            await holder.close()
