"""Test support: run a command as an unprivileged user that the test run makes (``lambdabox-rootless``), for what
lambdabox does without root; and, on a cgroup v2 host, a cgroup delegated to that user as systemd's ``Delegate=yes``
delegates one.

Why a mount namespace: this machine's Python lives under /root/.pyenv and /root is mode 700, so another user cannot
execute the project's .venv/bin/python (a venv's interpreter is its base interpreter, under /root). Rather than
change any host permission, :func:`run_as_user` starts the command in a private mount namespace that root makes
(``unshare --mount --propagation private``), where a tmpfs (mode 755) covers each ancestor directory of
``sys.base_prefix``, ``sys.prefix``, the interpreter and the repository that the user cannot traverse, and only the
entry on the way down to them is bind-mounted back, read-only, at the same path (/root/.pyenv here; nothing else of
/root shows). Then the command joins the delegated cgroup if one is given and drops to the user with ``setpriv``.
Nothing changes outside the namespace, which ends with the command. Needs root; without it, or without ``useradd``,
``unshare``, ``setpriv`` or ``mount``, the calling test is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "lambdabox-rootless"
REPO = Path(__file__).resolve().parent.parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
DELEGATED = CGROUP_ROOT / "lambdabox-rootless-test"
DELEGATED_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")  # what Delegate=yes chowns
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEADLINE_S = 10.0


def skip_unless_root(what: str) -> None:
    """Skip the calling test unless this process is root (``what`` says what needs it)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{PATH}")
    if path is None:
        pytest.skip(f"running a command as {USER} needs {name}, which is not on PATH")
    return path


def rootless_user() -> tuple[int, int, str]:
    """The unprivileged user's (uid, gid, name), made once (``useradd --system --create-home``) if absent; the
    calling test is skipped when it cannot be had."""
    skip_unless_root(f"making the user {USER}")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        argv = [_tool("useradd"), "--system", "--create-home", "--shell", "/bin/bash", USER]
        made = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        try:
            entry = pwd.getpwnam(USER)  # also when another run made it meanwhile
        except KeyError:
            pytest.skip(f"useradd {USER} failed (exit {made.returncode}): {made.stderr.strip()}")
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _traversable(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether the user may search (traverse) the directory: its owner, group or other x bit, as the kernel picks."""
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def hidden_ancestors(uid: int, gid: int, name: str) -> dict[Path, set[str]]:
    """The directories on the way to this interpreter and the repository that the user cannot traverse, each with
    the entries in it that lead there (what the namespace covers with a tmpfs and binds back)."""
    gids = {gid, *os.getgrouplist(name, gid)}
    targets = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent, REPO}
    targets |= {Path(os.path.realpath(target)) for target in targets}
    covers: dict[Path, set[str]] = {}
    for target in targets:
        ancestor = Path(target.anchor)
        for part in target.relative_to(target.anchor).parts:
            if not _traversable(ancestor, uid, gids):
                covers.setdefault(Path(os.path.realpath(ancestor)), set()).add(part)
            ancestor /= part
    return covers


def _namespace_script(uid: int, gid: int, stage: Path, cwd: str, cgroup: Path | None, name: str) -> str:
    """The shell script run as root in the new mount namespace, before it execs the command as the user."""
    mount, umount, setpriv = _tool("mount"), _tool("umount"), _tool("setpriv")
    q = shlex.quote
    lines = ["set -eu"]
    covers = sorted(hidden_ancestors(uid, gid, name).items(), key=lambda item: len(item[0].parts))
    if covers:
        # The originals are bound aside first: once a tmpfs covers a directory, what was in it is out of reach.
        lines.append(f"{q(mount)} -t tmpfs -o mode=700 lambdabox-stage {q(str(stage))}")
        binds: list[tuple[Path, str, Path]] = []
        for directory, entries in covers:
            for entry in sorted(entries):
                staged = stage / str(len(binds))
                source = q(str(directory / entry))
                lines.append(f"mkdir {q(str(staged))} && {q(mount)} --bind {source} {q(str(staged))}")
                binds.append((directory, entry, staged))
        for directory, _ in covers:  # shallowest first: a deeper one is reached through a bind made before it
            lines.append(f"{q(mount)} -t tmpfs -o mode=755 lambdabox-rootless {q(str(directory))}")
            for bound, entry, staged in binds:
                if bound == directory:
                    target = q(str(directory / entry))
                    lines.append(f"mkdir {target} && {q(mount)} --bind -o ro {q(str(staged))} {target}")
        lines.append(f"{q(umount)} -l {q(str(stage))}")
    if cgroup is not None:
        lines.append(f"echo $$ > {q(str(cgroup / 'cgroup.procs'))}")
    lines.append(f"cd -- {q(cwd)} && unset OLDPWD")
    lines.append(f'exec {q(setpriv)} --reuid={uid} --regid={gid} --init-groups -- "$@"')
    return "\n".join(lines)


def run_as_user(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float,
    cwd: str | None = None,
    cgroup: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the unprivileged user, with stdout and stderr captured, in a clean environment (the user's
    HOME, USER, LOGNAME and SHELL, a standard PATH, then ``env``), in ``cwd`` (default the user's home), inside
    ``cgroup`` (its ``cgroup.procs`` written before the privileges are dropped) when given. At the ``timeout`` its
    whole process group is killed and TimeoutExpired raised."""
    uid, gid, name = rootless_user()
    entry = pwd.getpwnam(name)
    environment = {
        "HOME": entry.pw_dir,
        "USER": name,
        "LOGNAME": name,
        "SHELL": entry.pw_shell,
        "PATH": PATH,
        **(env or {}),
    }
    unshare = _tool("unshare")
    stage = Path(tempfile.mkdtemp(prefix="lambdabox-rootless-stage-"))  # stays empty: the namespace mounts on it
    try:
        script = _namespace_script(uid, gid, stage, cwd or entry.pw_dir, cgroup, name)
        command = [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", *argv]
        with subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise
        return subprocess.CompletedProcess(argv, process.returncode, out, err)
    finally:
        stage.rmdir()


def delegate(cgroup: Path, uid: int, gid: int) -> None:
    """Hand ``cgroup`` to the user as systemd's Delegate=yes does: the directory and the files that let it move
    processes and enable controllers for its children."""
    os.chown(cgroup, uid, gid)
    for name in DELEGATED_FILES:
        os.chown(cgroup / name, uid, gid)


def delegate_cgroup_v2(uid: int, gid: int) -> Path:
    """As root on a cgroup v2 host (else the test is skipped): /sys/fs/cgroup/lambdabox-rootless-test, with memory
    and pids among its controllers, delegated to the user (a leftover of an earlier run is removed first). Remove
    it with :func:`remove_cgroup_tree`, or use :func:`delegated_cgroup_v2`."""
    skip_unless_root("delegating a cgroup")
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        pytest.skip(f"delegating a cgroup needs cgroup v2 at {CGROUP_ROOT}")
    if missing := {"memory", "pids"} - set((CGROUP_ROOT / "cgroup.controllers").read_text().split()):
        pytest.skip(f"cgroup v2 at {CGROUP_ROOT} has no {' and no '.join(sorted(missing))} controller")
    enabled = set((CGROUP_ROOT / "cgroup.subtree_control").read_text().split())
    if wanted := [c for c in ("memory", "pids") if c not in enabled]:
        (CGROUP_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
    remove_cgroup_tree(DELEGATED)
    DELEGATED.mkdir()
    delegate(DELEGATED, uid, gid)
    return DELEGATED


@contextlib.contextmanager
def delegated_cgroup_v2(uid: int, gid: int) -> Iterator[Path]:
    """:func:`delegate_cgroup_v2`, removed (with whatever was made and left in it) afterwards."""
    path = delegate_cgroup_v2(uid, gid)
    try:
        yield path
    finally:
        remove_cgroup_tree(path)


def remove_cgroup_tree(cgroup: Path) -> None:
    """Remove a cgroup v2 and every cgroup under it, killing the processes left in them (deepest first; each
    removal polled until its processes are gone, at most DEADLINE_S)."""
    if not cgroup.is_dir():
        return
    for child in [entry for entry in cgroup.iterdir() if entry.is_dir()]:
        remove_cgroup_tree(child)
    if (cgroup / "cgroup.kill").exists():
        (cgroup / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the killed processes are gone
            if time.monotonic() > deadline:
                raise
        time.sleep(0.005)
