"""Code and layers on disk: safe zip extraction (no path traversal, no escaping symlinks, modes kept)
and staging of a function's /var/task and /opt, within Lambda's 250 MB unzipped limit.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import zipfile
from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from lambdabox.core.errors import LayerError
from lambdabox.core.model import FunctionConfig
from lambdabox.sandbox import codecache

MAX_UNZIPPED_BYTES = 250 * 1024 * 1024  # code plus all layers
_MAX_LINK_HOPS: Final = 40  # as Linux's path resolution
_DRIVE: Final = re.compile(r"^[A-Za-z]:")
_CHUNK: Final = 1024 * 1024
_COMPRESSIONS: Final = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


@dataclass(frozen=True)
class StagedCode:
    """Where a function's code and merged layers are on disk."""

    task: Path  # directory to appear at /var/task
    opt: Path  # directory to appear at /opt (layers merged in order; may be empty)


@dataclass(frozen=True)
class _Entry:
    """One thing to create under the target: a file, a directory or a symlink, by relative path."""

    path: str  # "a/b/c", normalised, never empty
    kind: str  # "file", "dir" or "link"
    mode: int  # permission bits
    link: str = ""  # the symlink's target
    info: zipfile.ZipInfo | None = None  # zip source
    source: Path | None = None  # directory source
    times_ns: tuple[int, int] | None = None  # directory source's atime and mtime, kept for .pyc caches


# --- validation ------------------------------------------------------------------------------------


def _entry_path(name: str) -> str | None:
    """The normalised relative path of an archive name, or None if it would escape the target."""
    if "\\" in name or name.startswith("/") or _DRIVE.match(name) or "\0" in name:
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _unsafe_link(link: str) -> bool:
    """A symlink target that leaves the tree whatever the tree holds (or that no file system can hold)."""
    return link.startswith("/") or bool(_DRIVE.match(link)) or "\\" in link or "\0" in link


def _resolves_inside(
    root: Path, links: Mapping[str, str], files: Container[str], start: str, target: str, *, on_disk: bool
) -> bool:
    """Walk ``target`` from directory ``start`` as the kernel would, following the symlinks about to be
    made (``links``) and, if ``on_disk``, those already under ``root`` that no file entry (``files``)
    replaces. False if the walk climbs above root or a link is absolute.
    """
    current = start.split("/") if start else []
    pending = deque(target.split("/"))
    hops = 0
    if _unsafe_link(target):
        return False
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return False
            current.pop()
            continue
        current.append(part)
        key = "/".join(current)
        link = links.get(key)
        if link is None and on_disk and key not in files and os.path.islink(root / key):
            link = os.readlink(root / key)
        if link is None:
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS or _unsafe_link(link):
            return False
        current.pop()
        pending.extendleft(reversed(link.split("/")))
    return True


def _check(source: str, root: Path, entries: list[_Entry]) -> None:
    """Refuse (LayerError) any entry that would land outside ``root`` once every entry is made."""
    on_disk = False
    if root.is_dir():
        with os.scandir(root) as existing:
            on_disk = any(existing)
    links = {e.path: e.link for e in entries if e.kind == "link"}
    files = {e.path for e in entries if e.kind == "file"}
    parents_seen: set[str] = set()
    for entry in entries:
        parent = entry.path.rpartition("/")[0]
        prefix = ""
        for part in parent.split("/") if parent else []:
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix in links:
                raise LayerError(source, f"entry {entry.path!r} lies inside the symlink entry {prefix!r}")
        where = entry.path if entry.kind == "dir" else parent  # a directory entry may be a link on disk
        if on_disk and where not in parents_seen:
            parents_seen.add(where)
            if not _resolves_inside(root, links, files, "", where, on_disk=on_disk):
                raise LayerError(source, f"entry {entry.path!r} would be written through a symlink outside")
        if entry.kind == "link" and not _resolves_inside(root, links, files, parent, entry.link, on_disk=on_disk):
            raise LayerError(
                source, f"symlink entry {entry.path!r} -> {entry.link!r} points outside the extraction directory"
            )
    if on_disk and links:  # new symlinks can change where the ones already there lead
        for path, link in _disk_links(root):
            if path not in links and path not in files:
                parent = path.rpartition("/")[0]
                if not _resolves_inside(root, links, files, parent, link, on_disk=True):
                    rule = f"its symlinks would make the existing symlink {path!r} -> {link!r} point outside"
                    raise LayerError(source, rule)


def _disk_links(root: Path) -> list[tuple[str, str]]:
    """Every symlink under ``root`` (not following any), as (relative path, target)."""
    found: list[tuple[str, str]] = []
    stack = [("", str(root))]
    while stack:
        prefix, here = stack.pop()
        with os.scandir(here) as it:
            for item in it:
                if item.is_symlink():
                    found.append((prefix + item.name, os.readlink(item.path)))
                elif item.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{item.name}/", item.path))
    return found


# --- writing ---------------------------------------------------------------------------------------


def _clear(path: Path, keep_dir: bool) -> None:
    """Make room for a new entry at ``path``: later layers win over earlier ones."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def _write(source: str, root: Path, entries: list[_Entry], archive: zipfile.ZipFile | None) -> int:
    """Create the entries (symlinks last, directory modes after their contents); bytes written."""
    real_root = os.path.realpath(root)
    checked: set[str] = set()
    written = 0
    dirs: list[tuple[Path, int]] = []

    def ensure_inside(directory: str, entry: _Entry) -> None:  # the last guard, should _check miss a case
        if directory not in checked:
            real = os.path.realpath(directory)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise LayerError(source, f"entry {entry.path!r} would be written outside ({real})")
            checked.add(directory)

    for entry in sorted(entries, key=lambda e: e.kind == "link"):
        target = root / entry.path
        parent = str(target.parent)
        if parent not in checked:
            os.makedirs(parent, exist_ok=True)
            ensure_inside(parent, entry)
        if entry.kind == "dir":
            if not target.is_dir():  # a directory, or a symlink to one, is merged into
                _clear(target, keep_dir=False)
                target.mkdir()
            ensure_inside(str(target), entry)
            dirs.append((target, entry.mode))
            continue
        _clear(target, keep_dir=False)
        if entry.kind == "link":
            os.symlink(entry.link, target)
        elif entry.source is not None:
            shutil.copyfile(entry.source, target, follow_symlinks=False)
            os.chmod(target, entry.mode)
            if entry.times_ns is not None:
                os.utime(target, ns=entry.times_ns)
            written += os.path.getsize(target)
        else:
            assert archive is not None and entry.info is not None
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, archive.open(entry.info) as data:
                while chunk := data.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                os.fchmod(fd, entry.mode)
    for directory, mode in reversed(dirs):
        os.chmod(directory, mode)
    return written


# --- zips and directories --------------------------------------------------------------------------


_SPECIAL = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket"}  # fmt: skip


def _zip_entries(source: str, archive: zipfile.ZipFile) -> list[_Entry]:
    entries: list[_Entry] = []
    seen: set[str] = set()  # paths of files and symlinks
    for info in archive.infolist():
        path = _entry_path(info.filename)
        if path is None:
            raise LayerError(source, f"entry {info.filename!r} escapes the extraction directory")
        if not path:
            continue  # "./"
        if (special := _SPECIAL.get(stat.S_IFMT(info.external_attr >> 16))) is not None:
            raise LayerError(source, f"entry {path!r} is {special}: only files, directories and symlinks are extracted")
        if not info.is_dir():
            if path in seen:
                raise LayerError(source, f"entry {path!r} appears more than once (which one is meant?)")
            seen.add(path)
        if info.flag_bits & 0x1:
            raise LayerError(source, f"entry {path!r} is encrypted")
        if info.compress_type not in _COMPRESSIONS:
            raise LayerError(source, f"entry {path!r} uses compression method {info.compress_type}")
        mode = info.external_attr >> 16
        bits = stat.S_IMODE(mode) & 0o777
        if stat.S_ISLNK(mode):
            if info.file_size > 4096:
                raise LayerError(source, f"symlink entry {path!r} has a {info.file_size}-byte target")
            link = archive.read(info).decode("utf-8", "surrogateescape")
            entries.append(_Entry(path, "link", 0o777, link=link))
        elif info.is_dir() or stat.S_ISDIR(mode):
            entries.append(_Entry(path, "dir", (bits or 0o755) | 0o700))
        else:
            entries.append(_Entry(path, "file", (bits or 0o644) | 0o400, info=info))
    return entries


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise LayerError(str(archive), "no such file") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise LayerError(str(archive), f"not a zip file ({exc})") from None


def _zip_size(archive: Path) -> int:
    """The bytes ``archive`` unzips to (read from its central directory once while the file is unchanged)."""
    try:
        st = archive.stat()
    except OSError:  # refused by _open_zip, which names the archive and the reason
        return _read_zip_size(archive, 0, 0, 0, 0)
    return _read_zip_size(archive, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_zip_size(archive: Path, device: int, inode: int, size: int, mtime_ns: int) -> int:
    with _open_zip(archive) as zf:
        return sum(info.file_size for info in zf.infolist())


def extract_zip(archive: Path, target: Path) -> int:
    """Extract ``archive`` into ``target`` (merging over what is there); returns the bytes written.
    Every entry is checked before anything is written; LayerError names the archive and the entry.
    """
    source = str(archive)
    with _open_zip(archive) as zf:
        declared = sum(info.file_size for info in zf.infolist())
        if declared > MAX_UNZIPPED_BYTES:
            raise LayerError(source, f"unzips to {declared} bytes, over the {MAX_UNZIPPED_BYTES} byte limit")
        entries = _zip_entries(source, zf)
        _check(source, target, entries)
        target.mkdir(parents=True, exist_ok=True)
        try:
            return _write(source, target, entries, zf)
        except (OSError, zipfile.BadZipFile) as exc:
            raise LayerError(source, f"cannot extract: {exc}") from None


def _scan_dir(directory: Path) -> tuple[list[_Entry], int]:
    """Every file, directory and symlink under ``directory`` (not following links), and the file bytes."""
    entries: list[_Entry] = []
    size = 0
    stack = [("", directory)]
    while stack:
        prefix, here = stack.pop()
        with os.scandir(here) as it:
            for item in it:
                rel = f"{prefix}{item.name}"
                st = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    entries.append(_Entry(rel, "link", 0o777, link=os.readlink(item.path)))
                elif stat.S_ISDIR(st.st_mode):
                    entries.append(_Entry(rel, "dir", stat.S_IMODE(st.st_mode) | 0o700))
                    stack.append((rel + "/", Path(item.path)))
                elif stat.S_ISREG(st.st_mode):
                    mode, times = stat.S_IMODE(st.st_mode), (st.st_atime_ns, st.st_mtime_ns)
                    entries.append(_Entry(rel, "file", mode, source=Path(item.path), times_ns=times))
                    size += st.st_size
    return entries, size


def _copy_dir(layer: Path, entries: list[_Entry], target: Path) -> int:
    source = str(layer)
    _check(source, target, entries)
    try:
        return _write(source, target, entries, None)
    except OSError as exc:
        raise LayerError(source, f"cannot copy: {exc}") from None


# --- staging ---------------------------------------------------------------------------------------


def staged_signature(config: FunctionConfig) -> tuple[object, ...]:
    """What :func:`stage_function` copies or extracts, as it stands now: each zip's identity, size and time, and
    every entry of each layer directory with its modification time (a code directory is used in place: its edits
    show by themselves). Equal
    signatures taken at two moments mean a staging at the first is still what one at the second would give."""
    parts: list[object] = []
    for content in (config.code, *(layer.content for layer in config.layers)):
        if content.is_dir():
            if content != config.code:
                entries, _ = _scan_dir(content)
                parts.append(tuple((e.path, e.kind, e.mode, e.link, e.times_ns and e.times_ns[1]) for e in entries))
        else:
            st = content.stat()
            parts.append((str(content), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(parts)


def stage_function(config: FunctionConfig, work_dir: Path, cache: Path | None = None) -> StagedCode:
    """Lay out ``config``'s code and layers: a code directory is used in place, a .zip is extracted to
    ``work_dir/task``; layers are merged in order into ``work_dir/opt``. With a ``cache``
    (:mod:`lambdabox.sandbox.codecache`), a code zip, and layers that are all zips, are extracted there once per
    content instead, and used from there.
    """
    sources = [config.code, *(layer.content for layer in config.layers)]
    scans: dict[Path, list[_Entry]] = {}
    total = 0
    for content in sources:
        if content.is_dir():
            scans[content], size = _scan_dir(content)
        else:
            size = _zip_size(content)
        total += size
    if total > MAX_UNZIPPED_BYTES:
        raise LayerError(
            f"function {config.function_name}",
            f"code and layers unzip to {total} bytes; Lambda allows at most {MAX_UNZIPPED_BYTES} bytes "
            f"({MAX_UNZIPPED_BYTES // (1024 * 1024)} MB) unzipped",
        )
    layers = [layer.content for layer in config.layers]
    task_dir, opt = work_dir / "task", work_dir / "opt"
    for stale in (task_dir, opt):
        if os.path.lexists(stale):
            _clear(stale, keep_dir=False)
    try:
        task = config.code
        if config.code not in scans:
            task = _cached(cache, [config.code]) or task_dir
            if task is task_dir:
                extract_zip(config.code, task_dir)
        if layers and not any(layer in scans for layer in layers) and (cached := _cached(cache, layers)) is not None:
            return StagedCode(task=task, opt=cached)
        opt.mkdir(parents=True)
        for layer in layers:
            if layer in scans:
                _copy_dir(layer, scans[layer], opt)
            else:
                extract_zip(layer, opt)
    except BaseException:
        for partial in (task_dir, opt):
            if os.path.lexists(partial):
                _clear(partial, keep_dir=False)
        raise
    return StagedCode(task=task, opt=opt)


def _cached(cache: Path | None, archives: list[Path]) -> Path | None:
    """The cache's tree of ``archives`` (built now if it is not there), or None without a cache."""
    if cache is None:
        return None

    def build(directory: Path) -> None:
        for archive in archives:
            extract_zip(archive, directory)

    try:
        return codecache.tree(cache, archives, build)
    except OSError as error:
        raise LayerError(str(archives[-1]), f"cannot cache its extraction in {cache}: {error}") from None
