"""Owns finding what an earlier lambdabox left on the host when it died without cleaning up (a SIGKILL, a crash):
its environments' cgroups (removed by :func:`lambdabox.sandbox.cgroups.remove_left_behind`) and temporary
directories (:func:`remove_temporary_dirs`). Each is named after the process that made it, ``<pid>.<start
time>`` (:func:`owner`; the start time, in clock ticks since boot from /proc/<pid>/stat, tells a reused pid from
the owner), so that a later lambdabox can tell those whose owner is gone (:func:`orphans`) and remove them, once
per process and place (:func:`first_time`), saying what it removed. Stdlib only."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

_OWNED = re.compile(r"(\d+)\.(\d+)-")


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return int(fields[19])


def owner(pid: int | None = None) -> str:
    """The owner part of a name: ``<pid>.<start time>`` of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_time(pid)}"


def orphans(parent: Path, prefix: str) -> list[Path]:
    """The entries of ``parent`` named ``<prefix><owner>-...`` whose owner has gone, sorted."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in names:
        m = _OWNED.match(name, len(prefix)) if name.startswith(prefix) else None
        if m is not None and start_time(int(m.group(1))) != int(m.group(2)):
            found.append(parent / name)
    return sorted(found)


_asked: set[Path] = set()
_asked_lock = threading.Lock()


def first_time(place: Path) -> bool:
    """Whether this is the first time this process asks about ``place`` (each place is swept once)."""
    with _asked_lock:
        if place in _asked:
            return False
        _asked.add(place)
        return True


TEMPORARY_PREFIX = "lambdabox-"  # then the owner: lambdabox-<pid>.<start>-...


def temporary_prefix(what: str) -> str:
    """The prefix of a temporary directory this process makes for ``what``, for :func:`tempfile.mkdtemp`."""
    return f"{TEMPORARY_PREFIX}{owner()}-{what}-"


def remove_temporary_dirs(parent: Path | None = None) -> list[str]:
    """Remove the temporary directories left by lambdabox processes that are gone, the first time this process asks
    (``parent``: default the temporary directory); what was done."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    if not first_time(parent):
        return []
    uid = os.geteuid()  # another user's are theirs to remove (root's included)
    found = [path for path in orphans(parent, TEMPORARY_PREFIX) if uid == 0 or _owner_uid(path) == uid]
    for path in found:
        remove_tree(path)
    left = [path for path in found if path.exists()]
    said = [f"could not remove {path}, left by a lambdabox process that is gone" for path in left]
    if removed := len(found) - len(left):
        what = "a temporary directory" if removed == 1 else f"{removed} temporary directories"
        said.insert(0, f"removed {what} in {parent} left by lambdabox processes that are gone")
    return said


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything under it, also what its owner made unwritable (a function running as this user,
    in degraded mode, may leave a directory of mode 0500 or 0 in its /tmp; root needs no such help); what still
    cannot be removed is left, as ``shutil.rmtree(ignore_errors=True)`` leaves it."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path) or os.path.islink(path):
        return
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for directory, subdirectories, _ in os.walk(path):  # top-down: each directory opened up before it is listed
        for name in (os.path.join(directory, d) for d in subdirectories):
            if not os.path.islink(name):  # (chmod would follow a symlink out of the tree)
                with contextlib.suppress(OSError):
                    os.chmod(name, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _owner_uid(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None
