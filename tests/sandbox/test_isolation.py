"""Isolation: the environment's holder and its namespaces (Lambda's filesystem: the host's read-only, /var/task and
/opt read-only, /tmp a private tmpfs of ``tmp_mb`` MB, /etc/hosts and /etc/passwd, kept paths; a PID namespace whose
init is the holder's; a network namespace with only lo, up, and the outbound interface), Lambda's user and limits
(uid 993, someone unprivileged outside; no capabilities, no_new_privs, seccomp, RLIMIT_NOFILE), cgroups (limit, peak,
OOM, freezer), teardown (processes, orphans, holder, cgroups, namespaces, files), and the degraded mode."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import json
import os
import pwd
import signal
import sys
import time
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from lambdabox.core.errors import SandboxError
from lambdabox.loop import run as run_loop
from lambdabox.sandbox import cgroups as cgroups_module
from lambdabox.sandbox import held, outbound, rootfs
from lambdabox.sandbox import holder as holder_module
from lambdabox.sandbox.cgroups import CGROUP_ROOT
from lambdabox.sandbox.held import Holder
from lambdabox.sandbox.isolation import Isolation, open_isolation
from lambdabox.sandbox.namespace import SANDBOX_GID, SANDBOX_UID, SANDBOX_USER, Layout
from lambdabox.sandbox.processes import OwnedProcess
from support import host_cgroups

T = TypeVar("T")
PY = sys.executable
FULL = host_cgroups() is not None
needs_full = pytest.mark.skipif(not FULL, reason="needs root and cgroups (v2, or v1 memory and freezer)")
SRC = Path(holder_module.__file__).parents[2]  # the directory lambdabox is imported from (the holder's too)
SIOCGSKNS = 0x894C  # ioctl: a descriptor of the network namespace a socket belongs to
NO_OUTBOUND = (
    "no outbound network (slirp4netns not found): the environment reaches only its own loopback, not the "
    "internet nor this machine (install slirp4netns, or use the host's network)"
)


def run(coro: Coroutine[Any, Any, T], within: float = 60.0) -> T:
    """Run a test's body on lambdabox's loop, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(within):
            return await coro

    return run_loop(bounded())


def kept_under_tmp() -> list[str]:
    """What a fresh environment's /tmp holds: the top directories of the kept paths that lie under /tmp (this
    interpreter, when the checkout or the venv is there)."""
    tops = {
        Path(os.path.realpath(p)).relative_to("/tmp").parts[0]
        for p in (sys.prefix, sys.base_prefix)
        if os.path.realpath(p).startswith("/tmp/")
    }
    return sorted(tops)


def make_layout(root: Path, keep: tuple[Path, ...] = (), tmp_mb: int = 512) -> Layout:
    """A layout whose processes can run this interpreter (kept visible even when it lies under /tmp)."""
    interpreter = (Path(sys.prefix), Path(sys.base_prefix))
    layout = Layout(task=root / "task", opt=root / "opt", tmp=root / "tmp", keep=(*interpreter, *keep), tmp_mb=tmp_mb)
    for d, marker in ((layout.task, "handler.py"), (layout.opt, "layer.txt"), (layout.tmp, "scratch.txt")):
        d.mkdir(parents=True)
        (d / marker).write_text(marker)
    return layout


async def spawn(
    iso: Isolation, code: str, records: list[str], env: Mapping[str, str] | None = None, *, ahead: bool = False
) -> OwnedProcess:
    """Start ``code`` in the environment (at /var/task) as production does, its output lines into ``records``
    (``ahead``: another process will be started after it)."""
    proc = await OwnedProcess.start(
        [PY, "-c", code],
        env=dict(os.environ) if env is None else env,
        cwd="/var/task",
        label="fn",
        on_record=lambda _label, text: records.append(text),
        spawn=functools.partial(iso.spawn, ahead=ahead),
    )
    iso.register(proc.pid)
    return proc


def outside_uid() -> int:
    """Who Lambda's user (uid 993 inside) is outside: lambdabox's own user, or for root the unprivileged nobody."""
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def holder_of(iso: Isolation) -> Holder:
    holder = iso._namespace.holder
    assert holder is not None and holder.init_pid is not None, iso.degraded
    return holder


def inside(iso: Isolation, lambda_path: str) -> Path:
    """The host's path to a path of the environment: through its init's root where it has a mount namespace, else
    the layout's directory behind it."""
    if iso._namespace.holder is not None:
        return Path(iso._namespace.holder.root(lambda_path))
    return Path(iso.path(lambda_path))


async def poll_until(check: Any, within: float = 10.0) -> None:
    """Bounded poll loop: re-check every few ms until true, fail at the deadline."""
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.005)


async def end(proc: OwnedProcess, within: float = 10.0) -> int:
    """End a process as production does: SIGKILL to its group, then reap it and drain its output, bounded."""
    proc.signal(signal.SIGKILL)
    return await wait_exit(proc, within)


async def wait_exit(proc: OwnedProcess, within: float = 10.0) -> int:
    async with asyncio.timeout(within):
        return await proc.wait_exit()


async def run_code(iso: Isolation, code: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Run ``code`` to its end in the environment (it must exit 0); its output lines."""
    records: list[str] = []
    assert await wait_exit(await spawn(iso, code, records, env)) == 0, records
    return records


def status(pid: int) -> str:
    """The process's state as /proc/<pid>/stat shows it (psutil's names: ``stopped`` for T), or ``gone``."""
    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return "gone"


def stopped(pid: int) -> bool:
    """Stopped by a signal, or no longer running."""
    return status(pid) in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, "gone")


def frozen(iso: Isolation) -> bool:
    """Every process of the environment stopped: as the kernel reports the cgroup's freeze complete or, where the
    isolation freezes by signal (it says so in ``degraded``), each one stopped."""
    pids = iso.pids()
    if any("SIGSTOP" in difference for difference in iso.degraded):
        return all(stopped(pid) for pid in pids)
    return bool(pids) and iso.cgroups is not None and iso.cgroups.frozen()


def read_counter(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def ns_pids(pid: int) -> list[int]:
    """The ``NSpid`` line of the host's /proc/<pid>/status: its pid in each PID namespace, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def with_marker(marker: str) -> list[int]:
    """The host pids of the processes with ``marker`` in an argument (a scan of the host's /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(marker.encode() in arg for arg in argv):
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _inode(path: Path | str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def tasks_in(inode: int) -> list[str]:
    """Every namespace link of every task of the machine that is the namespace ``inode``, with the task's command
    line and parent (to tell what it is)."""
    found = []
    for link in Path("/proc").glob("[0-9]*/task/*/ns/*"):
        if _inode(link) == inode:
            try:
                process = psutil.Process(int(link.parts[2]))
                found.append(f"{link}: {process.cmdline()} (parent {process.ppid()}, started {process.create_time()})")
            except psutil.Error:
                found.append(str(link))
    return found


def patched_holder(patch: str, marker: str) -> tuple[str, ...]:
    """A holder command line that runs ``patch`` (with ``errno`` and the holder's ``syscalls`` imported) and then
    the holder, ``marker`` in its argv: to make one of the holder's steps fail, as the machine might."""
    code = (
        f"# {marker}\n"
        "import errno, sys\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        "from lambdabox.sandbox import holder, syscalls\n"
        f"{patch}\n"
        "holder.main()\n"
    )
    return (sys.executable, "-I", "-S", "-c", code)


COUNTER = (
    "import os, time\n"
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    "    with open('{tmp}/counter.new', 'w') as f: f.write(str(i))\n"
    "    os.replace('{tmp}/counter.new', '{tmp}/counter')\n"
    "    time.sleep(0.001)\n"
)


def daemon(marker: str) -> str:
    """Code that leaves a daemon behind (double fork, its own session, stdio on /dev/null) whose argv ends with
    ``marker``, and exits."""
    return (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        null = os.open('/dev/null', os.O_RDWR)\n"
        "        for fd in (0, 1, 2): os.dup2(null, fd)\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('forked', flush=True)\n"
    )


# ---- Lambda's filesystem -----------------------------------------------------------------------------------------


@needs_full
def test_namespace_shows_layout_hosts_and_kept_paths(tmp_path: Path) -> None:
    kept = tmp_path / "kept-venv"  # lies under the host's /tmp, which the environment's own /tmp hides
    kept.mkdir()
    (kept / "marker").write_text("kept")
    layout = make_layout(tmp_path / "env", keep=(kept,))
    code = (
        "import json, os, socket\n"
        "def writable(p):\n"
        "    try:\n"
        "        open(p, 'w').close(); return True\n"
        "    except OSError: return False\n"
        "print(json.dumps({'task': os.listdir('/var/task'), 'opt': os.listdir('/opt'),\n"
        "  'tmp': sorted(os.listdir('/tmp')), 'cwd': os.getcwd(), 'dev': sorted(os.listdir('/dev')),\n"
        f"  'kept': open({str(kept / 'marker')!r}).read(),\n"
        f"  'layout_tmp': os.path.exists({str(layout.tmp / 'scratch.txt')!r}),\n"
        "  'ip': socket.gethostbyname('sandbox.localdomain'), 'ip2': socket.gethostbyname('sandbox'),\n"
        "  'task_w': writable('/var/task/x'), 'opt_w': writable('/opt/x'), 'tmp_w': writable('/tmp/x')}))\n"
    )

    async def body() -> tuple[dict[str, Any], tuple[str, int] | None]:
        async with open_isolation(layout, memory_mb=256, name="ns") as iso:
            assert iso.degraded == ()
            assert iso.sockets is not None and iso.sockets is holder_of(iso)
            assert iso.net_namespace == f"/proc/{iso.sockets.init_pid}/ns/net"
            assert iso.path("/opt/extensions") == "/opt/extensions"
            listener = iso.take_api_listener()
            assert iso.take_api_listener() is None  # handed over once
            address = None
            if listener is not None:
                with listener:
                    address = listener.getsockname()
            records = await run_code(iso, code)
            assert (inside(iso, "/tmp") / "x").is_file()  # written there, in the environment's /tmp
        return json.loads(records[-1]), address

    seen, api = run(body())
    assert api == ("127.0.0.1", 9001)  # the Runtime API's listener, made inside the network namespace
    assert seen["task"] == ["handler.py"]
    assert seen["opt"] == ["layer.txt"]
    assert "scratch.txt" not in seen["tmp"] and not seen["layout_tmp"]  # the layout's tmp is not /tmp, nor seen
    assert seen["cwd"] == "/var/task"
    devices = [name for name in rootfs.DEVICES if os.path.exists(f"/dev/{name}")]
    assert seen["dev"] == sorted([*devices, "shm", "fd", "stdin", "stdout", "stderr"])  # a minimal /dev
    assert seen["kept"] == "kept"
    assert seen["ip"] == seen["ip2"] == "127.0.0.1"
    assert (seen["task_w"], seen["opt_w"], seen["tmp_w"]) == (False, False, True)
    assert not (layout.tmp / "x").exists()  # the environment's /tmp is a tmpfs of its own, not the layout's tmp
    assert not Path("/opt/layer.txt").exists()  # nothing leaked into the host's mount table
    assert "sandbox.localdomain" not in Path("/etc/hosts").read_text()
    assert SANDBOX_USER not in Path("/etc/passwd").read_text()


TMP_PROBE = (
    "import json, os, subprocess\n"
    "name = {name!r}\n"
    "with open('/tmp/' + name, 'w') as f: f.write('from the first process')\n"
    "vfs = os.statvfs('/tmp')\n"
    "mount = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/tmp'][-1]\n"
    "df = subprocess.run(['df', '-k', '/tmp'], capture_output=True, text=True, check=True).stdout.splitlines()\n"
    "chunk, written, error = b'x' * (1 << 20), 0, None\n"
    "fd = os.open('/tmp/big', os.O_WRONLY | os.O_CREAT)\n"
    "try:\n"
    "    while written < (64 << 20):\n"  # a bound, should the size not hold
    "        written += os.write(fd, chunk)\n"
    "except OSError as e:\n"
    "    error = e.errno\n"
    "print(json.dumps({{'bytes': vfs.f_blocks * vfs.f_frsize, 'fstype': mount[mount.index('-') + 1],\n"
    "  'df': df[-1].split(), 'written': written, 'error': error}}))\n"
)


@needs_full
def test_tmp_is_a_private_tmpfs_of_tmp_mb_shared_by_the_environments_processes(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "env", tmp_mb=8)
    name = f"lambdabox-tmp-{uuid.uuid4().hex}"
    read = f"import os; print(open('/tmp/{name}').read()); print(os.path.getsize('/tmp/big'))"

    async def body() -> tuple[dict[str, Any], list[str], list[str], int]:
        async with (
            open_isolation(layout, memory_mb=256, name="tmp") as iso,
            open_isolation(make_layout(tmp_path / "other"), memory_mb=128, name="tmp2") as other,
        ):
            seen = json.loads((await run_code(iso, TMP_PROBE.format(name=name)))[-1])
            second = await run_code(iso, read)  # another process of the same environment
            elsewhere = await run_code(
                other, f"import os; print(sorted(os.listdir('/tmp')), os.path.exists('/tmp/{name}'))"
            )
            owner = os.stat(inside(iso, f"/tmp/{name}")).st_uid  # who uid 993 inside is outside
        return seen, second, elsewhere, owner

    seen, second, elsewhere, owner = run(body())
    assert seen["fstype"] == "tmpfs"
    assert seen["bytes"] == 8 << 20  # EphemeralStorage's size
    assert seen["df"][1] == str(8 * 1024) and seen["df"][-1] == "/tmp"  # df shows it too (1K blocks)
    assert seen["error"] == errno.ENOSPC and 7 << 20 <= seen["written"] <= 8 << 20  # writing past the size fails
    assert second == ["from the first process", str(seen["written"])]
    assert elsewhere == [f"{kept_under_tmp()} False"]  # each environment has a /tmp of its own
    assert owner == outside_uid() and (owner != 0 or os.geteuid() != 0)  # never root outside
    assert sorted(p.name for p in layout.tmp.iterdir()) == ["scratch.txt"]  # nothing went to the layout's tmp
    assert not Path("/tmp", name).exists()  # nor to the host's /tmp


@needs_full
def test_writing_outside_tmp_fails_read_only_and_nothing_reaches_the_host(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    for shared in (layout.task / "handler.py", layout.opt / "layer.txt"):
        shared.chmod(0o666)  # anyone may write them: only the read-only mount stops it
    name = f"lambdabox-ro-{uuid.uuid4().hex}"
    code = (
        "import json, os\n"
        "def attempt(do, path):\n"
        "    try:\n"
        "        do(path); return 0\n"
        "    except OSError as e: return e.errno\n"
        "new = lambda p: open(p, 'x').close()\n"
        "got = {d: attempt(new, f'{d}/' + " + repr(name) + ") for d in ('', '/etc', '/var/task', '/opt')}\n"
        "got['mkdir /'] = attempt(os.mkdir, '/" + name + "')\n"
        "for path in ('/var/task/handler.py', '/opt/layer.txt', '/etc/hosts', '/etc/passwd'):\n"
        "    got['append ' + path] = attempt(lambda p: open(p, 'a').close(), path)\n"
        "print(json.dumps(got))\n"
    )

    async def body() -> dict[str, int]:
        async with open_isolation(layout, memory_mb=128, name="ro") as iso:
            return dict(json.loads((await run_code(iso, code))[-1]))

    hosts, passwd = Path("/etc/hosts").read_bytes(), Path("/etc/passwd").read_bytes()
    got = run(body())
    # lambdabox's /etc files are its own user's: Lambda's user, when that is someone else outside (nobody, for
    # root), has no permission to write them, which the kernel checks before the read-only mount
    etc = errno.EROFS if outside_uid() == os.geteuid() else errno.EACCES
    assert got == {
        "": errno.EROFS,
        "/etc": errno.EROFS,
        "/var/task": errno.EROFS,
        "/opt": errno.EROFS,
        "mkdir /": errno.EROFS,
        "append /var/task/handler.py": errno.EROFS,
        "append /opt/layer.txt": errno.EROFS,
        "append /etc/hosts": etc,
        "append /etc/passwd": etc,
    }
    for host in (Path("/"), Path("/etc"), Path("/var/task"), Path("/opt"), layout.task, layout.opt):
        assert not (host / name).exists(), host
    assert sorted(p.name for p in layout.task.iterdir()) == ["handler.py"]
    assert (layout.task / "handler.py").read_text() == "handler.py"
    assert (layout.opt / "layer.txt").read_text() == "layer.txt"
    assert (Path("/etc/hosts").read_bytes(), Path("/etc/passwd").read_bytes()) == (hosts, passwd)


# ---- Lambda's user, limits and processes -------------------------------------------------------------------------


IDENTITY = (
    "import getpass, grp, json, os, pwd, resource\n"
    "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
    "keys = ('Uid', 'Gid', 'CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp')\n"
    "print(json.dumps({'status': {k: status[k].split() for k in keys},\n"
    "  'ids': [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],\n"
    "  'user': getpass.getuser(), 'pw': list(pwd.getpwuid(993))[:4], 'group': grp.getgrgid(990).gr_name,\n"
    "  'nofile': resource.getrlimit(resource.RLIMIT_NOFILE),\n"
    "  'session': os.getsid(0) == os.getpid() == os.getpgid(0)}))\n"
)


@needs_full
def test_processes_run_as_lambdas_user_without_privileges_and_with_lambdas_limits(tmp_path: Path) -> None:
    # getpass.getuser() reads these first: the name must come from the environment's /etc/passwd
    env = {k: v for k, v in os.environ.items() if k not in ("LOGNAME", "USER", "LNAME", "USERNAME")}

    async def body() -> dict[str, Any]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="user") as iso:
            return dict(json.loads((await run_code(iso, IDENTITY, env))[-1]))

    seen = run(body())
    assert (SANDBOX_USER, SANDBOX_UID, SANDBOX_GID) == ("sbx_user1051", 993, 990)
    assert seen["ids"] == [993, 993, 990, 990]
    assert seen["status"]["Uid"] == ["993"] * 4 and seen["status"]["Gid"] == ["990"] * 4
    caps = {k: int(seen["status"][k][0], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert caps == dict.fromkeys(caps, 0)  # no capabilities, and none to be had through an exec
    assert seen["status"]["NoNewPrivs"] == ["1"]
    assert seen["status"]["Seccomp"] == ["2"]  # a filter
    assert seen["user"] == "sbx_user1051"
    assert seen["pw"] == ["sbx_user1051", "x", 993, 990] and seen["group"] == "sbx_user1051"
    assert seen["nofile"] == [1024, 1024]
    assert seen["session"] is True  # its own session


@needs_full
def test_a_process_sees_only_its_environments_processes(tmp_path: Path) -> None:
    probe = (
        "import json, os, time\n"
        "print(json.dumps({'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
        "  'me': os.getpid(), 'parent': os.getppid(), 'init': open('/proc/1/cmdline', 'rb').read().hex()}),\n"
        "  flush=True)\n"
        "time.sleep(600)\n"
    )

    async def body() -> tuple[dict[str, Any], int, dict[str, list[int]], dict[str, bytes]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="pids") as iso:
            holder = holder_of(iso)
            assert holder.init_pid is not None
            first: list[str] = []
            sleeper = await spawn(iso, "import os, time; print(os.getpid(), flush=True); time.sleep(600)", first)
            await poll_until(lambda: bool(first))
            records: list[str] = []
            proc = await spawn(iso, probe, records)
            await poll_until(lambda: bool(records))
            found = {"init": ns_pids(holder.init_pid), "sleeper": ns_pids(sleeper.pid), "probe": ns_pids(proc.pid)}
            commands = {"init": cmdline(holder.init_pid), "holder": cmdline(holder.process.pid)}
            for started in (sleeper, proc):
                assert await end(started) == -signal.SIGKILL
            return json.loads(records[-1]), int(first[0]), found, commands

    seen, sleeper, found, commands = run(body())
    assert found["init"][-1] == 1 and len(found["init"]) == 2  # the holder's init is PID 1 of a namespace of its own
    assert found["sleeper"][1:] == [sleeper] and found["probe"][1:] == [seen["me"]]  # (host pid, pid inside)
    assert seen["pids"] == [1, sleeper, seen["me"]]  # init, the other process, itself: nothing of the host
    assert (sleeper, seen["me"]) == (2, 3) and seen["parent"] == 1  # small pids, started by init
    assert bytes.fromhex(seen["init"]) == commands["init"] == commands["holder"]  # init is the holder's fork


@needs_full
def test_a_process_is_forked_into_the_cgroups_ahead_of_its_start_only_while_more_are_to_start(tmp_path: Path) -> None:
    """The move into the cgroups (which can wait for the kernel's cgroup lock) is made before the start is asked
    for: init forks the Init's first process ahead, and the next one after each start said to have more after it.
    One forked ahead that is gone by its start (killed) is replaced then; kill_all drops it."""
    sleeper = "import time; print('up', flush=True); time.sleep(600)"

    async def body() -> dict[str, Any]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="ahead") as iso:
            holder_of(iso)  # (the namespaces are had)
            await poll_until(lambda: len(iso.pids()) == 1)  # before any start: one process, in the cgroups
            [first_ahead] = iso.pids()
            records: list[str] = []
            extension = await spawn(iso, sleeper, records, ahead=True)
            await poll_until(lambda: len(iso.pids()) == 2)
            [second_ahead] = set(iso.pids()) - {extension.pid}
            os.kill(second_ahead, signal.SIGKILL)  # gone before it is asked to start anything
            await poll_until(lambda: status(second_ahead) == "gone")
            runtime = await spawn(iso, sleeper, records)
            await poll_until(lambda: records.count("up") == 2)
            last = set(iso.pids())
            await iso.kill_all()
            after_kill = iso.pids()
            again = await run_code(iso, "print('started after the kill')")
            return {
                "first": (first_ahead, extension.pid),
                "replaced": (second_ahead, runtime.pid),
                "last": (last, {extension.pid, runtime.pid}),
                "after_kill": after_kill,
                "again": again,
            }

    seen = run(body())
    first_ahead, extension = seen["first"]
    assert first_ahead == extension  # the process forked ahead is the one that was started
    killed, runtime = seen["replaced"]
    assert runtime != killed  # the one killed while it waited was replaced at the start
    assert seen["last"][0] == seen["last"][1]  # no process waits after the last start: only the two started
    assert seen["after_kill"] == []  # kill_all left nothing, nor forked anything ahead
    assert seen["again"] == ["started after the kill"]


@needs_full
def test_a_daemon_that_outlives_its_process_is_gone_after_the_isolation_closes(tmp_path: Path) -> None:
    marker = f"lambdabox-daemon-{uuid.uuid4().hex}"

    async def body() -> tuple[int, int, int, list[int]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="daemon") as iso:
            holder_of(iso)  # (the namespaces are had)
            assert await run_code(iso, daemon(marker)) == ["forked"]  # the process is gone, its daemon is not
            await poll_until(lambda: bool(with_marker(marker)))
            [pid] = with_marker(marker)
            return pid, psutil.Process(pid).ppid(), holder_of(iso).init_pid or 0, iso.pids()

    pid, parent, init, pids = run(body())
    assert parent == init  # an orphan, adopted by the environment's init
    assert pid in pids  # in the environment's cgroups
    assert not psutil.pid_exists(pid) and with_marker(marker) == []


@needs_full
def test_kill_all_takes_orphans_too_without_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups_module, "CGROUP_ROOT", tmp_path / "no-cgroups")
    marker = f"lambdabox-orphan-{uuid.uuid4().hex}"

    async def body() -> tuple[tuple[str, ...], int, list[int]]:
        async with open_isolation(make_layout(tmp_path / "env"), memory_mb=128, name="orphan") as iso:
            holder_of(iso)  # (the namespaces are had)
            assert await run_code(iso, daemon(marker)) == ["forked"]
            await poll_until(lambda: bool(with_marker(marker)))
            [pid] = with_marker(marker)
            tracked = iso.pids()  # no process tree holds it
            await iso.kill_all()
            await poll_until(lambda: status(pid) == "gone")  # SIGKILLed by init, and reaped by it
            return iso.degraded, pid, tracked

    degraded, pid, tracked = run(body())
    assert any(d.startswith("no memory limit") for d in degraded)
    assert pid not in tracked


@needs_full
def test_a_process_that_ends_before_lambdabox_reads_the_answer_keeps_its_host_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups_module, "CGROUP_ROOT", tmp_path / "no-cgroups")  # pids() walks the registered
    reaped: list[bool] = []
    left: list[int] = []

    def until_reaped(iso: Isolation, init: int) -> None:
        """Hold the event loop (so that init's answer waits, unread) until the process has run and init has reaped
        it: it wrote /tmp/ran, and init has no child left."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
            if inside(iso, "/tmp/ran").exists() and not children:
                reaped.append(True)
                return
            time.sleep(0.001)

    async def body() -> tuple[int, list[int], int]:
        async with open_isolation(make_layout(tmp_path / "env"), memory_mb=128, name="quick") as iso:
            holder = holder_of(iso)
            left.extend([holder.process.pid, holder.init_pid or 0])
            started = asyncio.ensure_future(spawn(iso, "open('/tmp/ran', 'w').close()", []))
            asyncio.get_running_loop().call_soon(until_reaped, iso, holder.init_pid or 0)  # once the request is sent
            proc = await started
            proc.signal(signal.SIGKILL)  # gone already: nothing happens
            return proc.pid, iso.pids(), await wait_exit(proc)

    pid, pids, rc = run(body())  # and the teardown has nothing to complain of
    assert reaped == [True]
    assert pid > 0  # its host pid all the same (not a pidfd's -1 once reaped)
    assert pids == [] and rc == 0  # its exit, as init saw it
    assert all(not psutil.pid_exists(p) for p in left)


@needs_full
def test_the_namespaces_are_had_whichever_of_init_and_ready_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_first = (
        "import os, select\n"
        "said_r, said_w = os.pipe()\n"
        "real_send = holder.send\n"
        "def send(control, message, *rest, **named):\n"
        "    if 'init' in message:\n"  # the holder: only once init has said ready
        "        select.select([said_r], [], [], 10)\n"
        "    real_send(control, message, *rest, **named)\n"
        "    if 'ready' in message:\n"
        "        os.write(said_w, b'1')\n"
        "holder.send = send\n"
    )
    monkeypatch.setattr(held, "COMMAND", patched_holder(ready_first, f"lambdabox-holder-{uuid.uuid4().hex}"))

    async def body() -> tuple[tuple[str, ...], list[str]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="order") as iso:
            return iso.degraded, await run_code(iso, "import os; print(os.listdir('/var/task'), os.getuid())")

    degraded, records = run(body())
    assert degraded == ()
    assert records == ["['handler.py'] 993"]


# ---- cgroups -----------------------------------------------------------------------------------------------------


@needs_full
@pytest.mark.cgroup2
def test_memory_hog_is_oom_killed(tmp_path: Path) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (4 << 20))\n"

    async def body() -> tuple[int, bool, bool, int]:
        async with open_isolation(make_layout(tmp_path), memory_mb=64, name="oom") as iso:
            before = iso.oom_kill_count() > 0
            rc = await (await spawn(iso, hog, [])).wait_exit()
            return rc, before, (iso.oom_kill_count() > 0), iso.peak_memory_bytes()

    rc, before, after, peak = run(body())
    assert rc == -signal.SIGKILL
    assert (before, after) == (False, True)
    assert peak <= 64 << 20


@needs_full
@pytest.mark.cgroup2
def test_peak_memory_grows_after_a_child_allocates_50_mb(tmp_path: Path) -> None:
    alloc = "import time\nblob = b'x' * (50 << 20)\nprint('allocated', flush=True)\ntime.sleep(600)\n"

    async def body() -> tuple[int, int]:
        async with open_isolation(make_layout(tmp_path), memory_mb=512, name="peak") as iso:
            records: list[str] = []
            idle = await spawn(iso, "print('up')", records)
            assert await idle.wait_exit() == 0
            base = iso.peak_memory_bytes()
            proc = await spawn(iso, alloc, records)
            await poll_until(lambda: "allocated" in records)
            await end(proc)
            return base, iso.peak_memory_bytes()

    base, peak = run(body())
    assert peak - base >= 45 << 20


async def _freeze_roundtrip(iso: Isolation, counter: Path, tmp_in_env: str) -> tuple[int, int, int]:
    proc = await spawn(iso, COUNTER.format(tmp=tmp_in_env), [])
    await poll_until(lambda: read_counter(counter) > 5)
    iso.freeze_at_once()
    await poll_until(lambda: frozen(iso))  # the kernel completes a freeze on its own
    frozen_at = read_counter(counter)
    # Frozen: the counter must not move during a bounded observation window.
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.3
    while loop.time() < until:
        assert read_counter(counter) == frozen_at
        await asyncio.sleep(0.01)
    still = read_counter(counter)
    iso.thaw()
    await poll_until(lambda: read_counter(counter) > still + 5)
    resumed = read_counter(counter)
    assert not frozen(iso)
    assert await end(proc) == -signal.SIGKILL
    return frozen_at, still, resumed


@needs_full
@pytest.mark.cgroup2
def test_freeze_stops_a_counting_child_and_thaw_resumes_it(tmp_path: Path) -> None:
    async def body() -> tuple[int, int, int]:
        async with open_isolation(make_layout(tmp_path), memory_mb=256, name="freeze") as iso:
            return await _freeze_roundtrip(iso, inside(iso, "/tmp") / "counter", "/tmp")

    frozen_at, still, resumed = run(body())
    assert still == frozen_at
    assert resumed > still


# ---- teardown ----------------------------------------------------------------------------------------------------


@needs_full
@pytest.mark.cgroup2
def test_everything_is_gone_after_the_context_exits(tmp_path: Path) -> None:
    # The test holds a descriptor of each namespace until it has looked: a namespace's inode number is reused as soon
    # as it is freed (by any other environment made meanwhile, on a busy machine), while one held is never reused.
    held_ns: dict[str, int] = {}

    async def body() -> tuple[list[Path], list[int], Path | None]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="gone") as iso:
            records: list[str] = []
            proc = await spawn(iso, "import time; print('up', flush=True); time.sleep(600)", records)
            await poll_until(lambda: "up" in records)
            assert iso.pids() == [proc.pid]
            assert iso.cgroups is not None
            cgroups = list(iso.cgroups.paths())  # a memory and a freezer cgroup on v1, one cgroup on v2
            assert len(cgroups) == {"v1": 2, "v2": 1}[iso.cgroups.hierarchy] and all(c.is_dir() for c in cgroups)
            holder = holder_of(iso)
            assert iso.net_namespace == f"/proc/{holder.init_pid}/ns/net"
            for kind in ("net", "mnt", "pid", "user"):
                held_ns[kind] = os.open(f"/proc/{holder.init_pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                assert os.fstat(held_ns[kind]).st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino, kind  # its own
            assert _inode(f"/proc/{proc.pid}/ns/mnt") == os.fstat(held_ns["mnt"]).st_ino
            files = iso._namespace.files_dir
            assert files is not None and files.is_dir()
            left = [*iso.pids(), holder.process.pid, holder.init_pid or 0]
        assert await wait_exit(proc) == -signal.SIGKILL  # killed by the teardown
        return cgroups, left, files

    try:
        cgroups, left, files = run(body())
        for kind, fd in held_ns.items():  # no process is in the namespaces and no other descriptor holds them
            ino = os.fstat(fd).st_ino
            assert not tasks_in(ino), kind
            ours = [f for f in Path(f"/proc/{os.getpid()}/fd").iterdir() if f.name != str(fd) and _inode(f) == ino]
            assert not ours, kind
    finally:
        for fd in held_ns.values():
            os.close(fd)
    assert not any(c.exists() for c in cgroups)
    assert all(not psutil.pid_exists(p) for p in left)  # the process, the holder and its init
    assert files is not None and not files.exists()
    for parent in (CGROUP_ROOT / "memory", CGROUP_ROOT / "lambdabox"):  # v1's memory controller, v2's own subtree
        if parent.is_dir():
            assert not [d for d in parent.iterdir() if "gone-" in d.name]


@needs_full
@pytest.mark.cgroup2
def test_teardown_also_when_the_body_raises(tmp_path: Path) -> None:
    seen: list[Path] = []  # the cgroups
    files: list[Path] = []
    left: list[int] = []  # the holder and its init

    async def body() -> None:
        procs: list[OwnedProcess] = []
        try:
            async with open_isolation(make_layout(tmp_path), memory_mb=128, name="raise") as iso:
                assert iso.cgroups is not None
                seen.extend(iso.cgroups.paths())
                holder = holder_of(iso)
                left.extend([holder.process.pid, holder.init_pid or 0])
                assert iso._namespace.files_dir is not None
                files.append(iso._namespace.files_dir)
                procs.append(await spawn(iso, "import time; time.sleep(600)", []))
                raise RuntimeError("boom")
        finally:
            # The holder starts a process only once it is in the cgroups: killed by the teardown, always.
            codes = [await wait_exit(p) for p in procs]
            assert codes == [-signal.SIGKILL], codes

    with pytest.raises(RuntimeError, match="boom"):
        run(body())
    assert seen and not any(p.exists() for p in seen)
    assert len(files) == 1 and not files[0].exists()
    assert len(left) == 2 and all(not psutil.pid_exists(p) for p in left)


# ---- the degraded mode -------------------------------------------------------------------------------------------


def test_degraded_mode_maps_paths_freezes_by_signal_and_samples_memory(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    alloc = "import time\nblob = b'x' * (50 << 20)\nprint('allocated', flush=True)\ntime.sleep(600)\n"

    async def body() -> tuple[Isolation, tuple[int, int, int], int, int, list[int], list[str], str]:
        async with open_isolation(layout, memory_mb=128, name="deg", isolate=False) as iso:
            assert iso.sockets is None and iso.net_namespace is None and iso.take_api_listener() is None
            assert iso.path("/opt/extensions") == str(layout.opt / "extensions")
            assert iso.path("/var/task") == str(layout.task)
            assert iso.path("/tmp") == str(layout.tmp)
            assert iso.path("/etc/passwd") == "/etc/passwd"
            counts = await _freeze_roundtrip(iso, layout.tmp / "counter", iso.path("/tmp"))
            base = iso.peak_memory_bytes()
            records: list[str] = []
            hog = await spawn(iso, alloc, records)
            await poll_until(lambda: "allocated" in records)
            peak = iso.peak_memory_bytes()
            pids = iso.pids()
            assert hog.pid in pids
            started = psutil.Process(hog.pid)
            argv, cwd = started.cmdline(), started.cwd()
            await iso.kill_all()
            assert await hog.wait_exit() == -signal.SIGKILL
            assert not (iso.oom_kill_count() > 0)
        return iso, counts, base, peak, pids, argv, cwd

    iso, (frozen_at, still, resumed), base, peak, _, argv, cwd = run(body())
    assert argv == [PY, "-c", alloc]  # started as is: no cgroups to join first
    assert cwd == str(layout.task)  # /var/task is the layout's task dir
    assert still == frozen_at and resumed > still
    assert peak - base >= 45 << 20
    text = " | ".join(iso.degraded)
    assert "no mount namespace" in text and str(layout.task) in text
    assert "no memory limit" in text
    assert "/etc/hosts unchanged" in text
    assert "no network namespace (isolate=False): the Runtime API is at a port of its own on 127.0.0.1" in text
    iso.api_port = 4321
    assert (
        "no network namespace (isolate=False): the Runtime API is at 127.0.0.1:4321, not 127.0.0.1:9001, "
        "and extensions share the host's ports"
    ) in iso.degraded


LEAF = "import time; print('tree up', flush=True); time.sleep(600)"
MIDDLE = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {LEAF!r}]); time.sleep(600)"
TREE = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {MIDDLE!r}])\ntime.sleep(600)\n"
"""A process, its child and its grandchild; the grandchild says ``tree up`` once all three run their own code (a
SIGSTOP that caught the grandchild between its fork and its exec would hold its parent in vfork, not stopped)."""


def test_degraded_freeze_at_once_stops_a_whole_tree_without_waiting(tmp_path: Path) -> None:
    def states(pids: list[int]) -> set[str]:
        return {status(pid) for pid in pids}

    async def body() -> tuple[int, set[str], set[str]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="tree", isolate=False) as iso:
            records: list[str] = []
            proc = await spawn(iso, TREE, records)
            await poll_until(lambda: "tree up" in records)
            pids = iso.pids()
            assert len(pids) == 3 and proc.pid in pids  # the process, its child and its grandchild
            iso.freeze_at_once()  # returns at once; the kernel stops each process on its own
            await poll_until(lambda: states(pids) == {psutil.STATUS_STOPPED})
            all_stopped = states(pids)
            iso.thaw()
            await poll_until(lambda: psutil.STATUS_STOPPED not in states(pids))
            iso.freeze_at_once()
            iso.thaw()  # a thaw right behind the freeze undoes it
            await poll_until(lambda: psutil.STATUS_STOPPED not in states(pids))
            resumed = states(pids)
            await iso.kill_all()
            assert await wait_exit(proc) == -signal.SIGKILL  # reaped, its pipes drained and closed
            return len(pids), all_stopped, resumed

    count, all_stopped, resumed = run(body())
    assert count == 3 and all_stopped == {psutil.STATUS_STOPPED}
    assert psutil.STATUS_STOPPED not in resumed and "gone" not in resumed


def test_missing_layout_dir_is_refused(tmp_path: Path) -> None:
    layout = Layout(task=tmp_path / "nope", opt=tmp_path, tmp=tmp_path)

    async def body() -> None:
        async with open_isolation(layout, memory_mb=128, name="bad"):
            raise AssertionError("should not open")

    with pytest.raises(SandboxError, match=r"layout\.task"):
        run(body())


@needs_full
def test_namespace_without_cgroups_degrades_only_the_accounting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups_module, "CGROUP_ROOT", tmp_path / "no-cgroups")
    layout = make_layout(tmp_path / "env")

    async def body() -> tuple[tuple[str, ...], list[str], tuple[int, int, int]]:
        async with open_isolation(layout, memory_mb=128, name="nocg") as iso:
            assert iso.cgroups is None
            records = await run_code(iso, "import os; print(os.listdir('/var/task'), os.getcwd(), os.getuid())")
            counts = await _freeze_roundtrip(iso, inside(iso, "/tmp") / "counter", "/tmp")
            return iso.degraded, records, counts

    degraded, records, (frozen_at, still, resumed) = run(body())
    assert records == ["['handler.py'] /var/task 993"]
    assert any(d.startswith("no memory limit") for d in degraded)
    assert not any("mount namespace" in d or "network namespace" in d for d in degraded)
    assert still == frozen_at and resumed > still


@needs_full
def test_cgroups_without_namespace_when_the_namespace_setup_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse = (
        "real = syscalls.mount\n"
        "def mount(source, target, *rest):\n"
        "    if target.endswith('/var/task'):\n"
        "        raise OSError(errno.EPERM, 'mount /var/task: Operation not permitted')\n"
        "    real(source, target, *rest)\n"
        "syscalls.mount = mount\n"
    )
    marker = f"lambdabox-holder-{uuid.uuid4().hex}"
    monkeypatch.setattr(held, "COMMAND", patched_holder(refuse, marker))
    layout = make_layout(tmp_path / "env")

    async def body() -> tuple[tuple[str, ...], list[int], int, list[str], Path | None]:
        async with open_isolation(layout, memory_mb=128, name="nons") as iso:
            assert iso._namespace.holder is None and iso.sockets is None and iso.net_namespace is None
            assert iso.path("/var/task") == str(layout.task)
            records: list[str] = []
            proc = await spawn(iso, "import os, time; print(os.getcwd(), flush=True); time.sleep(600)", records)
            await poll_until(lambda: bool(records))
            pids = iso.pids()
            await iso.kill_all()
            return iso.degraded, pids, await wait_exit(proc), records, iso._namespace.files_dir

    degraded, pids, rc, records, files = run(body())
    why = "namespace setup failed: cannot build the environment: [Errno 1] mount /var/task: Operation not permitted"
    assert degraded[0] == f"no mount namespace ({why}): code is at {layout.task}, not /var/task"
    assert degraded[-1].startswith(f"no network namespace ({why}): ")
    assert not any("memory limit" in d for d in degraded)
    assert len(pids) == 1  # in the cgroups all the same
    assert rc == -signal.SIGKILL
    assert records == [str(layout.task)]
    assert files is None or not files.exists()
    assert with_marker(marker) == []  # the holder that failed did not stay


@needs_full
def test_a_holder_that_cannot_be_started_gives_degraded_mode_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(held, "COMMAND", (str(tmp_path / "no-such-interpreter"), "-c", "pass"))
    layout = make_layout(tmp_path / "env")

    async def body() -> tuple[tuple[str, ...], Path | None]:
        async with open_isolation(layout, memory_mb=128, name="nohold") as iso:
            assert iso._namespace.holder is None and iso.path("/var/task") == str(layout.task)
            return iso.degraded, iso._namespace.files_dir

    degraded, files = run(body())
    assert degraded[0].startswith("no mount namespace (namespace setup failed: cannot start the holder: ")
    assert files is not None and not files.exists()


# ---- the network namespace ---------------------------------------------------------------------------------------


NET_PROBE = (
    "import json, os, socket\n"
    "listener = socket.create_server(('127.0.0.1', 0))\n"
    "client = socket.create_connection(listener.getsockname(), timeout=5)\n"  # lo is up
    "print(json.dumps({'ifs': socket.if_nameindex(), 'net': os.stat('/proc/self/ns/net').st_ino}))\n"
)


def socket_namespace(iso: Isolation) -> int:
    """The network namespace (inode) of a socket the isolation's ``sockets`` makes."""
    assert iso.sockets is not None
    with iso.sockets.socket() as made:
        fd = fcntl.ioctl(made.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@needs_full
def test_a_process_inside_sees_lo_up_and_the_outbound_interface(tmp_path: Path) -> None:
    async def body() -> tuple[dict[str, Any], int, int, tuple[str, ...]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="net") as iso:
            records = await run_code(iso, NET_PROBE)
            assert iso.net_namespace is not None
            return json.loads(records[-1]), os.stat(iso.net_namespace).st_ino, socket_namespace(iso), iso.degraded

    seen, net, socket_net, degraded = run(body())
    assert seen["ifs"] == [[1, "lo"], [2, "tap0"]] and degraded == ()
    assert seen["net"] == net == socket_net != os.stat("/proc/self/ns/net").st_ino


def outbound_probe(port: int, loopback_port: int | None = None) -> str:
    """Code that greets the server at ``port`` of the machine by each of its names, reads the resolver, and (given
    ``loopback_port``) tries the host's loopback through the gateway."""
    return (
        "import json, socket\n"
        "got = {}\n"
        "for name in ('host.lambdabox.internal', 'host.docker.internal'):\n"
        f"    with socket.create_connection((name, {port}), timeout=5) as s:\n"
        "        got[name] = s.recv(64).decode()\n"
        "got['resolv'] = [l for l in open('/etc/resolv.conf') if l.startswith('nameserver')]\n"
        f"for where in ([] if {loopback_port!r} is None else ['{outbound.network()[2]}', 'host.lambdabox.internal']):\n"
        "    try:\n"
        f"        socket.create_connection((where, {loopback_port!r}), timeout=5).close()\n"
        "        got['loopback at ' + where] = 'connected'\n"
        "    except OSError as e:\n"
        "        got['loopback at ' + where] = repr(e)\n"
        "print(json.dumps(got))\n"
    )


async def _greeting_server(host: str = "127.0.0.1") -> asyncio.Server:
    """A TCP server on ``host`` that greets each connection with its peer's address."""

    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello {writer.get_extra_info('peername')[0]}".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(greet, host, 0)


@needs_full
@pytest.mark.skipif(outbound.probe() is not None, reason="needs slirp4netns")
@pytest.mark.skipif(outbound.host_address() is None, reason="needs a route off the host")
@pytest.mark.cgroup2  # and in the VM, whose own address (10.0.2.15) is on slirp4netns's usual network
def test_the_environment_reaches_the_host_by_name_but_not_its_loopback(tmp_path: Path) -> None:
    async def body() -> tuple[list[str], int | None]:
        server = await _greeting_server("0.0.0.0")  # what a user exposes to environments
        port = server.sockets[0].getsockname()[1]
        loopback_only = await _greeting_server()  # as lambdabox's own Invoke API listens
        hidden = loopback_only.sockets[0].getsockname()[1]
        async with server, loopback_only, open_isolation(make_layout(tmp_path), memory_mb=128, name="out") as iso:
            records = await run_code(iso, outbound_probe(port, hidden))
            slirp = iso._outbound._process
            pid = slirp.pid if slirp is not None else None
        return records, pid

    records, slirp = run(body())
    seen = json.loads(records[-1])
    # slirp4netns connects from the host on the environment's behalf, as Lambda's NAT would
    greeting = f"hello {outbound.host_address()}"
    assert seen["host.lambdabox.internal"] == seen["host.docker.internal"] == greeting
    assert seen["resolv"] == [f"nameserver {outbound.dns_address()}\n"]
    # a port only on the host's loopback (as lambdabox's Invoke API) is out of reach: the gateway no longer leads
    # to the host's loopback, and the host's address is not its loopback
    assert seen[f"loopback at {outbound.network()[2]}"] == "OSError(101, 'Network is unreachable')"
    assert seen["loopback at host.lambdabox.internal"] == "ConnectionRefusedError(111, 'Connection refused')"
    assert slirp is not None and not psutil.pid_exists(slirp)  # ended with the environment


@needs_full
def test_without_slirp4netns_only_loopback_and_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "probe", lambda: "slirp4netns not found")

    async def body() -> tuple[tuple[str, ...], list[str]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="noout") as iso:
            code = NET_PROBE + "print(open('/etc/hosts').read().count('host.lambdabox.internal'))\n"
            return iso.degraded, await run_code(iso, code)

    degraded, records = run(body())
    assert json.loads(records[0])["ifs"] == [[1, "lo"]] and records[1] == "0"
    assert degraded == (NO_OUTBOUND,)


@needs_full
def test_network_false_keeps_the_host_network_and_says_so(tmp_path: Path) -> None:
    async def body() -> tuple[Isolation, list[str]]:
        server = await _greeting_server()
        port = server.sockets[0].getsockname()[1]
        async with server, open_isolation(make_layout(tmp_path), memory_mb=128, name="nonet", network=False) as iso:
            assert iso.net_namespace is None and iso.sockets is None and iso.take_api_listener() is None
            records = await run_code(iso, NET_PROBE + "print(os.listdir('/var/task'))\n")
            records += await run_code(iso, outbound_probe(port))
            return iso, records

    iso, records = run(body())
    assert json.loads(records[0])["net"] == os.stat("/proc/self/ns/net").st_ino
    assert records[1] == "['handler.py']"  # the mount namespace all the same
    seen = json.loads(records[2])  # the machine's names are its own loopback here
    assert seen["host.lambdabox.internal"] == seen["host.docker.internal"] == "hello 127.0.0.1"
    assert len(iso.degraded) == 1 and iso.degraded[0].startswith("no network namespace (network=False): ")


@needs_full
def test_a_network_namespace_that_fails_leaves_the_mount_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_lo = "def no_lo():\n    raise OSError(errno.EPERM, 'cannot bring lo up')\nsyscalls.loopback_up = no_lo\n"
    monkeypatch.setattr(held, "COMMAND", patched_holder(no_lo, f"lambdabox-holder-{uuid.uuid4().hex}"))

    async def body() -> tuple[tuple[str, ...], list[str], str | None]:
        async with open_isolation(make_layout(tmp_path / "env"), memory_mb=128, name="netfail") as iso:
            records = await run_code(iso, "import os; print(os.listdir('/var/task'))")
            return iso.degraded, records, iso.net_namespace

    degraded, records, net = run(body())
    assert records == ["['handler.py']"] and net is None
    assert len(degraded) == 1 and degraded[0].startswith("no network namespace (namespace setup failed: ")
    assert "cannot bring lo up" in degraded[0]
    assert degraded[0].endswith(
        "the Runtime API is at a port of its own on 127.0.0.1, not 127.0.0.1:9001, and extensions share the host's "
        "ports"
    )
