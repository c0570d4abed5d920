"""Owns an environment's namespaces: the holder, a shell script run under ``unshare`` that sets up the mount
namespace (/var/task, /opt, /tmp, /etc/hosts) and the network namespace (only ``lo``, up) and holds them until
its stdin closes; the probes that say whether the machine allows them, and the hosts file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEADLINE_S = 5.0
"""Bound on every wait: holder ready, FROZEN/THAWED, cgroup empty, holder exit."""
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


class Namespace:
    """The holder of one environment's mount namespace (and network namespace, where one can be had)."""

    def __init__(self, layout: Layout, *, network: bool = True) -> None:
        self.layout = layout
        self.network = network  # False: no network namespace even where one could be had
        self.net_why: str | None = None  # why there is no network namespace
        self.holder: asyncio.subprocess.Process | None = None
        self.nsenter = "nsenter"
        self.hosts_dir: Path | None = None

    def path(self, lambda_path: str) -> str:
        if self.holder is not None:
            return lambda_path
        for top, host in (("/var/task", self.layout.task), ("/opt", self.layout.opt), ("/tmp", self.layout.tmp)):
            if lambda_path == top:
                return str(host)
            if (rest := _under(lambda_path, top)) is not None:
                return str(host / rest)
        return lambda_path

    async def start(self) -> str | None:
        """Start the namespaces' holder, with a network namespace when it can be had (else ``net_why`` says why
        not); None, or why there can be no mount namespace."""
        if (why := _probe_namespace()) is not None:
            self.net_why = why
            return why
        self.nsenter = shutil.which("nsenter") or "nsenter"
        hosts = _write_hosts()
        self.hosts_dir = hosts.parent
        self.net_why = "network=False" if not self.network else _probe_network()
        if self.net_why is None:
            if (why := await self._spawn(hosts, shutil.which("ip") or "ip")) is None:
                return None
            self.net_why = why  # try again without one
        why = await self._spawn(hosts, None)
        if why is not None:
            self.net_why = why
        return why

    async def _spawn(self, hosts: Path, ip: str | None) -> str | None:
        """Start a holder, in a new network namespace given ``ip``; None, or why it failed."""
        script = _holder_script(self.layout, hosts, ip)
        net = ["--net"] if ip is not None else []
        self.holder = holder = await asyncio.create_subprocess_exec(
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
        await self.stop()
        return f"namespace setup failed: {err.decode(errors='replace').strip() or 'no ready signal'}"

    async def stop(self) -> None:
        holder, self.holder = self.holder, None
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
