"""What an earlier lambdabox left behind: names that carry their owner (pid and start time), the ones whose owner is
gone, and the temporary directories removed once per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lambdabox.sandbox import leftovers


@pytest.fixture(autouse=True)
def _nothing_asked_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leftovers, "_asked", set())


def gone_owner() -> str:
    """The owner part of a name made by a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = leftovers.owner(child.pid)
    child.communicate(b"", timeout=30)
    return owner


def test_the_owner_is_the_pid_and_its_start_time_which_tells_a_reused_pid() -> None:
    pid, start = leftovers.owner().split(".")
    assert int(pid) == os.getpid()
    assert int(start) == leftovers.start_time(os.getpid()) and int(start) > 0
    assert leftovers.start_time(2**22 + 1) is None  # beyond pid_max: no such process


def test_orphans_are_the_entries_whose_owner_is_gone(tmp_path: Path) -> None:
    mine, gone = leftovers.owner(), gone_owner()
    reused = f"{os.getpid()}.{leftovers.start_time(os.getpid())}1"  # this pid, another start: a reused pid
    for name in (f"x-{mine}-Fn-1", f"x-{gone}-Fn-2", f"x-{reused}-Fn-3", f"{gone}-Fn-4", "x-Fn-5", "x-12-Fn-6"):
        (tmp_path / name).mkdir()
    assert leftovers.orphans(tmp_path, "x-") == sorted([tmp_path / f"x-{gone}-Fn-2", tmp_path / f"x-{reused}-Fn-3"])
    assert leftovers.orphans(tmp_path, "") == [tmp_path / f"{gone}-Fn-4"]
    assert leftovers.orphans(tmp_path / "nowhere", "x-") == []


def test_temporary_directories_of_a_gone_owner_are_removed_once_and_said(tmp_path: Path) -> None:
    gone = gone_owner()
    prefix = leftovers.temporary_prefix("Fn")
    assert prefix == f"lambdabox-{leftovers.owner()}-Fn-"
    left = [tmp_path / f"lambdabox-{gone}-Fn-abc", tmp_path / f"lambdabox-{gone}-env-def"]
    for path in left:
        (path / "tmp" / "deep").mkdir(parents=True)
        (path / "tmp" / "deep" / "file").write_text("x")
    kept = [tmp_path / f"{prefix}ghi", tmp_path / "lambdabox-test-jkl", tmp_path / "other"]
    for path in kept:
        path.mkdir()

    said = leftovers.remove_temporary_dirs(tmp_path)
    assert said == [f"removed 2 temporary directories in {tmp_path} left by lambdabox processes that are gone"]
    assert sorted(tmp_path.iterdir()) == sorted(kept)

    (tmp_path / f"lambdabox-{gone}-Fn-later").mkdir()
    assert leftovers.remove_temporary_dirs(tmp_path) == []  # once per process
    assert (tmp_path / f"lambdabox-{gone}-Fn-later").exists()


def test_another_users_temporary_directories_are_left_to_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / f"lambdabox-{gone_owner()}-Fn-abc"
    theirs.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: theirs.stat().st_uid + 1)
    assert leftovers.remove_temporary_dirs(tmp_path) == []
    assert theirs.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to nobody in a forked child")
def test_a_tree_its_owner_made_unwritable_is_removed_all_the_same() -> None:
    """As a function running as this user leaves its /tmp in degraded mode: directories of mode 0500 and 0, a symlink
    out of the tree (whose target must keep its mode). Done by ``nobody`` in a child, where the modes bind (in a
    directory of /tmp it can reach: pytest's are root's own)."""
    base = Path(tempfile.mkdtemp(prefix="lambdabox-test-"))
    os.chmod(base, 0o755)
    os.chown(base, 65534, 65534)  # (as /tmp is the user's to remove their own entries from)
    work, outside = base / "work", base / "outside"
    for directory in (work, outside):
        directory.mkdir(mode=0o755)
        os.chown(directory, 65534, 65534)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody from here on; reports what it saw, then exits without pytest's teardown
        try:
            os.setgid(65534)
            os.setuid(65534)
            (work / "tmp" / "locked" / "deep").mkdir(parents=True)
            (work / "tmp" / "locked" / "deep" / "file").write_text("x")
            (work / "tmp" / "locked" / "out").symlink_to(outside)
            os.chmod(work / "tmp" / "locked" / "deep", 0)
            os.chmod(work / "tmp" / "locked", 0o500)
            shutil.rmtree(work, ignore_errors=True)
            plain_left = work.exists()
            leftovers.remove_tree(work)
            os.write(write, f"{plain_left} {work.exists()} {oct(outside.stat().st_mode & 0o777)}".encode())
        except BaseException as error:
            os.write(write, repr(error).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    shutil.rmtree(base)
    assert said == "True False 0o755"  # rmtree alone left it; remove_tree took it all; the link's target untouched
