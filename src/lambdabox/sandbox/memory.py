"""Owns the count of the resident file-backed pages an environment's processes map (the interpreter, its shared
libraries, mmapped files), from /proc/<pid>/smaps, and the part of it that the environment's cgroup was not charged
for (:class:`UnchargedFiles`): pages already in the host's page cache when the environment first mapped them are
charged to whichever cgroup read them first, yet Lambda, which starts every microVM cold, counts them.

What counts, per mapping of /proc/<pid>/smaps: ``Rss`` minus ``Anonymous`` (a private file mapping's copied-on-write
pages are anonymous: charged to the environment's cgroup like any other anonymous memory), for every mapping backed
by an inode. So anonymous mappings, ``[heap]``, ``[stack]``, ``[vvar]``, ``[vdso]`` and named anonymous ones (inode
0) are left out, and a private mapping of /dev/zero counts nothing (its pages are all anonymous). A deleted file's
pages still are page cache, and so are shared memory's (memfd, SysV shm, a shared anonymous mapping, shown as
``/dev/zero (deleted)``): they count, as the kernel counts them in the cgroup's own mapped file figure
(``file_mapped``/``mapped_file``) that is subtracted from this one. Each distinct mapping, keyed by (device, inode,
offset, size), counts once across the processes (a fork's libraries, a file two processes map): the most resident
of its copies. Pages of one file mapped at different offsets or sizes by different processes may be counted twice;
pages resident in one process's copy but not in another's are not added up (the largest copy counts). A process
that is gone, or whose smaps cannot be read, is skipped."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

KIB = 1024
MappingKey = tuple[bytes, int, int, int]  # device, inode, offset, size


# A mapping of /proc/<pid>/smaps: its header (start-end perms offset device inode [path]), then its fields, Rss
# before Anonymous, in kB.
MAPPING = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) (\S+) (\d+).*\n"
    rb"(?:.*\n)*?Rss: +(\d+) kB\n"
    rb"(?:.*\n)*?Anonymous: +(\d+) kB$",
    re.MULTILINE,
)


def file_mappings(pid: int) -> dict[MappingKey, int]:
    """The resident file-backed bytes of each file mapping of ``pid`` (empty when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            text = f.read()
    except OSError:  # gone (FileNotFoundError, ProcessLookupError), not ours to read (PermissionError)
        return {}
    found: dict[MappingKey, int] = {}
    for start, end, offset, device, inode, rss, anonymous in MAPPING.findall(text):
        if inode != b"0" and (resident := (int(rss) - int(anonymous)) * KIB) > 0:
            key = (device, int(inode), int(offset, 16), int(end, 16) - int(start, 16))
            found[key] = max(found.get(key, 0), resident)
    return found


def mapped_file_bytes(pids: Iterable[int]) -> int:
    """The resident file-backed pages the processes map together, each distinct mapping counted once (the module's
    docstring says what counts)."""
    best: dict[MappingKey, int] = {}
    for pid in pids:
        for key, resident in file_mappings(pid).items():
            if resident > best.get(key, 0):
                best[key] = resident
    return sum(best.values())


class UnchargedFiles:
    """The largest figure seen of an environment's mapped file pages charged to other cgroups than its own: the
    resident file pages its processes map (:func:`mapped_file_bytes`) less those its cgroup was charged for.

    Scanning the smaps takes about a millisecond a process, so it is done only when the cgroup's peak has changed
    since the last scan, or its set of processes has; otherwise the last figure is reused. A mapping that grows
    without either changing (a warm invoke touching more of a file already in the page cache, within the peak) is
    seen at the next change."""

    def __init__(self, scan: Callable[[Iterable[int]], int] = mapped_file_bytes) -> None:
        self.bytes = 0
        self._scan = scan  # what counts the processes' mapped file pages (a test counts its calls)
        self._peak: int | None = None
        self._pids: frozenset[int] = frozenset()

    def update(self, peak: int, pids: frozenset[int], charged: Callable[[], int]) -> int:
        """The figure, rescanned if ``peak`` or ``pids`` differ from the last scan's; ``charged()`` gives the mapped
        file bytes charged to the cgroup itself, read only when scanning."""
        if peak != self._peak or pids != self._pids:
            self._peak, self._pids = peak, pids
            if pids:
                self.bytes = max(self.bytes, self._scan(pids) - charged())
        return self.bytes
