"""A content-addressed cache of extracted code and layers, so that a zip is extracted once, not at every cold start:
``<root>/<key>`` is the tree a sequence of zip archives gives when extracted in order, ``key`` the SHA-256 of their
SHA-256s. A tree is built in a directory of its own and renamed into place, so a concurrent builder never sees half of
one; environments use it read-only (it is mounted read-only at /var/task or /opt). Each use touches it; trees unused
for :data:`PRUNE_AFTER_S` are removed, at most once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PRUNE_AFTER_S = 7 * 24 * 3600
_BUILDING = ".building-"  # a tree being built (one left behind by a killed builder is pruned after an hour)
_CHUNK = 1024 * 1024
_digests: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime) -> SHA-256: each archive read once
_pruned: set[Path] = set()
_lock = threading.Lock()  # (staging runs in worker threads)


def digest(archive: Path) -> str:
    """The SHA-256 of ``archive``'s bytes (remembered while the file is unchanged)."""
    st = archive.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if (known := _digests.get(key)) is not None:
        return known
    sha = hashlib.sha256()
    with archive.open("rb") as data:
        while chunk := data.read(_CHUNK):
            sha.update(chunk)
    _digests[key] = sha.hexdigest()
    return _digests[key]


def tree(root: Path, archives: Sequence[Path], build: Callable[[Path], object]) -> Path:
    """The cached tree of ``archives`` extracted in order, ``build(directory)`` making it on first use."""
    key = hashlib.sha256("\n".join(digest(a) for a in archives).encode()).hexdigest()
    target = root / key
    root.mkdir(parents=True, exist_ok=True)
    _prune_once(root)
    if target.is_dir():
        with contextlib.suppress(OSError):
            os.utime(target)
        return target
    building = Path(tempfile.mkdtemp(prefix=_BUILDING, dir=root))
    try:
        building.chmod(0o755)  # (mkdtemp's 0700 would keep the environment's user out)
        build(building)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():  # not another builder's tree renamed into place first
            raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return target


def prune(root: Path, now: float | None = None) -> list[Path]:
    """Remove the trees unused for PRUNE_AFTER_S, and builds abandoned for an hour; the paths removed."""
    now = time.time() if now is None else now
    removed = []
    with os.scandir(root) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if age > (3600 if entry.name.startswith(_BUILDING) else PRUNE_AFTER_S):
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _prune_once(root: Path) -> None:
    with _lock:
        if root in _pruned:
            return
        _pruned.add(root)
    prune(root)
