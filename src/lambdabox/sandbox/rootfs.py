"""Owns Lambda's filesystem inside an environment, built by its holder in the holder's own mount namespace: the
host's tree read-only, with the function's code at /var/task and its layers at /opt (both read-only), a private
/tmp (a tmpfs of EphemeralStorage's size), a minimal /dev, the PID namespace's /proc, and lambdabox's files over
/etc's (hosts, resolv.conf, passwd, group); then it becomes the root and the host's root is let go.

A mount point the host lacks (such as /var/task) is made by covering its parent with a tmpfs that holds the
parent's entries bound back, so that nothing is written to the host. Stdlib only (the holder imports it).
"""

from __future__ import annotations

import os

from lambdabox.sandbox import syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:  # (not imported when run: the holder starts in a few ms)
    from typing import Any

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
"""The device nodes of /dev (bound from the host's), with /dev/shm, /dev/fd and the std links."""


def build(fs: dict[str, Any], sources: list[int]) -> None:
    """Build the filesystem described by ``fs`` and make it the calling process's root (in its mount namespace).
    Every host path is reached through a descriptor lambdabox opened (``sources``, by index), so that no directory
    on the way needs to be open to the user inside: ``root`` an empty directory to build in; ``reach``
    ``[directory, [[entry, source, is_dir], ...]]``, directories of the host the user may not traverse, each
    covered by a tmpfs that holds only the entries given; ``binds`` ``[source, target, read_only, is_dir]`` in
    order; ``tmp_mb`` the size of /tmp; ``tmp_keep`` ``[source, path, is_dir]``, host paths under /tmp that stay
    visible at the same path."""
    root = fs["root"]
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    syscalls.mount("/", root, None, syscalls.MS_BIND | syscalls.MS_REC)
    for directory, entries in fs["reach"]:  # outer ones first
        syscalls.mount("tmpfs", root + directory, "tmpfs", 0, "mode=755")
        for name, source, is_dir in entries:
            _make(f"{root}{directory}/{name}", is_dir)
            _bind(_fd(sources, source), f"{root}{directory}/{name}")
    ours: set[str] = set()  # directories on a tmpfs of the build's own
    for point in ("/var/task", "/var/lang", "/var/runtime", "/opt", "/tmp", "/dev", "/proc"):
        _ensure(root, point, is_dir=True, ours=ours)
    for source, target, read_only, is_dir in fs["binds"]:
        _ensure(root, target, is_dir=is_dir, ours=ours)
        _bind(_fd(sources, source), root + target, read_only=read_only)
    _make_dev(root + "/dev")
    syscalls.make_read_only_tree(root)
    tmp = root + "/tmp"
    syscalls.mount("tmpfs", tmp, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, f"size={fs['tmp_mb']}m,mode=1777")
    for source, path, is_dir in fs["tmp_keep"]:
        os.makedirs(root + (path if is_dir else os.path.dirname(path)), exist_ok=True)
        if not is_dir:
            _make(root + path, is_dir=False)
        _bind(_fd(sources, source), root + path, read_only=True)
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
    syscalls.mount("shm", root + "/dev/shm", "tmpfs", flags, "mode=1777")
    syscalls.mount("proc", root + "/proc", "proc", flags | syscalls.MS_NOEXEC)
    os.chdir(root)
    syscalls.pivot_root(".", ".")  # the old root ends up on top of the new one, at the same place
    syscalls.umount(".", syscalls.MNT_DETACH)
    os.chdir("/")


def show(source: str, target: str) -> None:
    """Once built (and become the root), show the directory ``source`` (a path inside) read-only at ``target``, one
    of the empty mount points (/var/lang, /var/runtime)."""
    _bind(source, target, read_only=True)


def _fd(sources: list[int], index: int) -> str:
    return f"/proc/self/fd/{sources[index]}"


def _bind(source: str, target: str, *, read_only: bool = False) -> None:
    syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
    if read_only:  # a bind mount becomes read-only only by a remount; its other flags are kept
        flags = syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | syscalls.mount_flags(target)
        syscalls.mount(None, target, None, flags)


def _ensure(root: str, point: str, *, is_dir: bool, ours: set[str]) -> None:
    """Make ``root + point`` exist (a directory, or an empty file) without writing to the host: only inside a tmpfs
    of the build's own (``ours``: such directories), covering the host's parent with one where needed."""
    path = root + point
    if os.path.lexists(path):
        return
    parent = os.path.dirname(point)
    _ensure(root, parent, is_dir=True, ours=ours)
    if parent not in ours:
        _cover(root + parent)
        ours.add(parent)
    _make(path, is_dir)
    if is_dir:
        ours.add(point)


def _make(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, exist_ok=True)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _cover(target: str) -> None:
    """A tmpfs over ``target`` holding each of its entries bound back (links copied), reached through a descriptor
    of the directory it covers."""
    below = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries = sorted(os.listdir(f"/proc/self/fd/{below}"))
        syscalls.mount("tmpfs", target, "tmpfs", 0, "mode=755")
        for name in entries:
            source, inside = f"/proc/self/fd/{below}/{name}", os.path.join(target, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), inside)
                continue
            _make(inside, os.path.isdir(source))
            _bind(source, inside)
    finally:
        os.close(below)


def _make_dev(dev: str) -> None:
    syscalls.mount("tmpfs", dev, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "mode=755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _make(f"{dev}/{name}", is_dir=False)
            syscalls.mount(f"/dev/{name}", f"{dev}/{name}", None, syscalls.MS_BIND)
    os.mkdir(f"{dev}/shm")
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(link, f"{dev}/{name}")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
