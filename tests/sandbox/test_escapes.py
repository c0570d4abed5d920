"""Escape attempts, each made from inside the function (tests/fixtures/escape_handler.py) and from inside an
extension (tests/fixtures/escape_ext.py, on its first INVOKE), by the same probes (tests/fixtures/escape_probes.py):
writing to the read-only filesystem, remounting it, new namespaces or init's, leaving the memory cgroup, reaching
the host's processes, outliving the environment, filling /tmp, opening too many files, allocating past MemorySize,
the privileges a process has, and what the host shares with the sandbox (kernel settings, System V IPC, unix
sockets and device nodes on the host's tree, kept directories). Each must fail as it does in Lambda, and the
environment must go on working. One environment runs most probes: the extension's during the first invoke (the
function does nothing), the function's during the second, and a third invoke shows the environment still works;
the out-of-memory and thread-limit probes get environments of their own.

The probes of what the host shares guard against a sandbox user who is root outside (as lambdabox's own user was,
under root, until the holder mapped Lambda's user to nobody outside) and against the host's IPC and UTS
namespaces: each of these reached the host once."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lambdabox.core.model import FunctionConfig, LambdaFailure, LayerConfig, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.options import Options
from lambdabox.environment.report import InvokeResult
from support import FIXTURES, PYTHON, Recorder, extension_script, host_cgroups, run

SANDBOX = (
    os.geteuid() == 0
    and os.path.exists("/proc/self/ns/user")
    and os.path.exists("/proc/self/ns/pid")
    and all(shutil.which(tool) for tool in ("unshare", "mount", "id"))
)
pytestmark = pytest.mark.skipif(not SANDBOX, reason="needs root (user, mount and PID namespaces), unshare, mount, id")
HIERARCHY = host_cgroups()
needs_memory_cgroup = pytest.mark.skipif(HIERARCHY is None, reason="needs root and a memory cgroup")
T = TypeVar("T")

EXTENSION = "escape-ext"
WHO = {"function": "function", "extension": EXTENSION}
PROBES = [
    "writes", "remount", "namespaces", "cgroups", "processes", "daemon", "fill_tmp", "files", "privileges",
    "sysctls", "host_ipc", "host_socket", "host_device",
]  # fmt: skip
HOST_NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")  # the ones the holder makes
DEADLINE_S = 10.0
TIMEOUT_S = 60.0  # the function's: ample for the probes, which take about a second on a real machine
RUN_S = 180.0  # for a whole environment's run
MIB = 1024 * 1024
IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


# ---- the environment under attack ------------------------------------------------------------------------------


def escape_function(
    root: Path,
    environment: dict[str, str],
    *,
    memory_mb: int,
    ext_probes: list[str] | None = None,
    ext_script: str = "escape_ext.py",
) -> FunctionConfig:
    """The escape handler in /var/task, and a directory layer with the escape extension (``ext_script``, from
    tests/fixtures) and the probes at /opt; the extension runs ``ext_probes`` on its first INVOKE. A timeout long
    enough for the probes on a slow (emulated) machine: they take about a second here."""
    code, layer = root / "code", root / "layer"
    (layer / "extensions").mkdir(parents=True)
    code.mkdir()
    for name in ("escape_handler.py", "escape_probes.py"):
        shutil.copy(FIXTURES / name, code / name)
    shutil.copy(FIXTURES / "escape_probes.py", layer / "escape_probes.py")
    ext = layer / "extensions" / EXTENSION
    ext.write_bytes(extension_script(ext_script))
    ext.chmod(0o755)
    env = {
        "ESCAPE_HOST_PID": str(os.getpid()),
        "ESCAPE_EXT_PROBES": ",".join(ext_probes or []),
        "ESCAPE_PYTHON": sys._base_executable,
        **environment,
    }
    return FunctionConfig(
        "Fn", "Fn", PYTHON, "escape_handler.handle", code, (LayerConfig("escape", layer),), env, TIMEOUT_S, memory_mb
    )


def invoke(env: Any, event: dict[str, Any]) -> Any:
    return env.invoke(json.dumps(event).encode())


def body(result: InvokeResult) -> Any:
    assert isinstance(result.outcome, Response), result.outcome
    return json.loads(result.outcome.body)


def marked(marker: str) -> dict[int, list[str]]:
    """Every process of the host whose argv holds ``marker``: pid -> argv."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if marker.encode() in argv:
                    found[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


async def poll(check: Callable[[], T]) -> T:
    """``check()`` until it returns something true, at most DEADLINE_S (then TimeoutError); that value."""
    async with asyncio.timeout(DEADLINE_S):
        while True:  # what is polled (the host's processes) has no event to wait for
            if value := check():
                return value
            await asyncio.sleep(0.01)


def two_or_more(found: dict[int, list[str]]) -> dict[int, list[str]]:
    return found if len(found) >= 2 else {}


def escape_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs if d.is_dir() for p in d.glob("escape-*"))


# ---- what the host offers: a message queue, a unix socket and a device node of root's, outside /tmp ------------


@dataclass
class Bait:
    ipc_key: int
    socket_path: Path
    device: Path
    server: socket.socket
    connections: list[dict[str, Any]] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        return {
            "ESCAPE_IPC_KEY": str(self.ipc_key),
            "ESCAPE_SOCKET": str(self.socket_path),
            "ESCAPE_DEVICE": str(self.device),
        }

    def accept_all(self) -> None:
        """Every connection the sandbox made to the socket: who said it was, and its uid as the host sees it."""
        while True:
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(DEADLINE_S)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                said = conn.recv(100).decode(errors="replace").strip()
                self.connections.append({"said": said, "uid": int.from_bytes(creds[4:8], sys.byteorder)})


def _host_dir() -> Path | None:
    """A directory of the host outside /tmp (the sandbox has a /tmp of its own, the rest of the tree read-only)."""
    for candidate in (Path("/var/tmp"), Path.home()):
        real = os.path.realpath(candidate)
        if os.path.isdir(real) and real != "/tmp" and not real.startswith("/tmp/") and os.access(real, os.W_OK):
            return Path(real)
    return None


@contextlib.contextmanager
def bait() -> Iterator[Bait]:
    where = _host_dir()
    if where is None:
        pytest.skip("no writable host directory outside /tmp for the bait socket and device")
    libc = ctypes.CDLL(None, use_errno=True)
    queue, key = -1, 0
    for _ in range(16):
        key = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        queue = libc.msgget(key, IPC_CREAT | IPC_EXCL | 0o600)
        if queue >= 0:
            break
    if queue < 0:
        raise OSError(ctypes.get_errno(), "msgget")
    directory = Path(tempfile.mkdtemp(prefix="lambdabox-escape-", dir=where))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(directory / "root-only.sock"))
        (directory / "root-only.sock").chmod(0o600)
        server.listen(8)
        server.setblocking(False)
        device = directory / "null"
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a /dev/null, root's only
        yield Bait(key, directory / "root-only.sock", device, server)
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
        libc.msgctl(queue, IPC_RMID, None)


# ---- one environment, every probe from both sides ----------------------------------------------------------------


@dataclass
class Probed:
    results: dict[str, dict[str, Any]]  # who -> probe -> what it found
    config: FunctionConfig
    first: InvokeResult  # the extension probed
    second: InvokeResult  # the function probed
    third: InvokeResult  # nothing: the environment still works
    recorder: Recorder
    degraded: tuple[str, ...]
    memory_cgroup: str | None  # the environment's memory cgroup, as /proc/self/cgroup names it
    daemons: dict[int, list[str]]  # the marked processes seen on the host while the environment was open
    daemons_left: dict[int, list[str]]  # ... and once it was closed
    host_files: list[Path]  # escape-* files found on the host (then removed)
    kept: Path | None  # a host directory under /tmp kept visible inside (a copy of the runtime cache)
    kept_files: list[Path]
    bait: Bait
    seconds: float


def _memory_cgroup(env: Any) -> str | None:
    cgroups = env.isolation.cgroups
    if cgroups is None:
        return None
    base = Path("/sys/fs/cgroup/memory") if cgroups.hierarchy == "v1" else Path("/sys/fs/cgroup")
    (path,) = [p for p in cgroups.paths() if p.is_relative_to(base) and (cgroups.hierarchy == "v2" or p != base)]
    return "/" + str(path.relative_to(base))


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probed]:
    root = tmp_path_factory.mktemp("escapes")
    marker = f"escape-daemon-{uuid.uuid4().hex}"
    kept: Path | None = None
    if Options().cache_dir.is_dir():  # a copy under /tmp: lambdabox keeps the runtime cache visible inside
        kept = root / "cache"
        shutil.copytree(Options().cache_dir, kept, symlinks=True)
    options = Options(cache_dir=kept) if kept is not None else Options()
    with bait() as offered:
        environment = {"ESCAPE_MARKER": marker, **offered.environment()}
        if kept is not None:
            environment["ESCAPE_KEPT"] = str(kept)
        config = escape_function(root, environment, memory_mb=1024, ext_probes=PROBES)
        recorder = Recorder()
        daemons: dict[int, list[str]] = {}
        host_files: list[Path] = []

        async def go() -> tuple[list[InvokeResult], tuple[str, ...], str | None, dict[int, list[str]]]:
            async with open_environment(config, options, [recorder]) as env:
                results = [await invoke(env, {"probes": []}), await invoke(env, {"probes": PROBES})]
                layout = env.isolation.layout
                host_files.extend(
                    escape_files(config.code, config.layers[0].content, layout.opt, Path("/etc"), Path("/"))
                )
                with contextlib.suppress(TimeoutError):  # the extension's and the function's
                    daemons.update(await poll(lambda: two_or_more(marked(marker))))
                results.append(await invoke(env, {"probes": []}))
                degraded, memory_cgroup = env.degraded, _memory_cgroup(env)
            with contextlib.suppress(TimeoutError):  # closed: every process of the environment is to go, soon
                await poll(lambda: not marked(marker))
            return results, degraded, memory_cgroup, marked(marker)

        started = time.monotonic()
        (first, second, third), degraded, memory_cgroup, left = run(go(), RUN_S)
        seconds = time.monotonic() - started
        offered.accept_all()
        kept_files = escape_files(kept) if kept is not None else []
        for path in [*host_files, *kept_files]:
            path.unlink()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        results = {"function": json.loads(second.outcome.body) if isinstance(second.outcome, Response) else {}}
        said = recorder.extension_says("probes")
        results["extension"] = said[0]["results"] if said else {}
        yield Probed(
            results, config, first, second, third, recorder, degraded, memory_cgroup, daemons, left, host_files, kept,
            kept_files, offered, seconds,
        )  # fmt: skip


both = pytest.mark.parametrize("who", ["function", "extension"])


def probe(probed: Probed, who: str, name: str) -> Any:
    """What the ``who`` found by the probe ``name``; a probe that did not run fails the test."""
    found = probed.results[who].get(name)
    if found is None or "raised" in found:
        pytest.fail(f"the {who} did not run {name}: {found or probed.results[who]}")
    return found


def test_the_environment_is_sandboxed_and_works_after_every_probe(probed: Probed) -> None:
    assert not [d for d in probed.degraded if d.startswith("no mount namespace")], probed.degraded
    assert [r.report.status for r in (probed.first, probed.second)] == ["success", "success"]
    assert sorted(probed.results["function"]) == sorted([*PROBES, *(f"{p}_s" for p in PROBES)])
    assert sorted(probed.results["extension"]) == sorted(probed.results["function"])
    assert body(probed.third) == {}  # after every probe, the environment still works...
    assert probed.third.report.status == "success" and probed.third.report.init_duration_ms is None  # ...unreset
    assert [e["eventType"] for e in probed.recorder.extension_says("event")] == ["INVOKE"] * 3 + ["SHUTDOWN"]
    if probed.memory_cgroup is not None:
        assert probed.first.report.max_memory_used_mb <= 1024  # within MemorySize, /tmp filled to 512 MB
    assert probed.seconds < RUN_S


@both
def test_the_filesystem_is_read_only_and_nothing_reaches_the_host(probed: Probed, who: str) -> None:
    found = probe(probed, who, "writes")
    assert found["name"] == f"escape-{WHO[who]}-write"
    created = {place: result for place, result in found["create"].items() if place != str(probed.kept)}
    assert created == {"/": errno.EROFS, "/etc": errno.EROFS, "/var/task": errno.EROFS, "/opt": errno.EROFS}
    # A file the user does not own, on a read-only bind mount: EACCES, the permission being checked before the
    # mount's read-only flag; EROFS where the filesystem itself is read-only (Lambda's likely answer).
    assert set(found["overwrite"].values()) <= {errno.EROFS, errno.EACCES}, found["overwrite"]
    assert len(found["overwrite"]) == 3
    assert probed.host_files == []  # not in the code's directory, the layer's, the staged /opt, /etc or /
    for copied in (probed.config.code / "escape_handler.py", probed.config.layers[0].content / "escape_probes.py"):
        assert copied.read_bytes() == (FIXTURES / copied.name).read_bytes()


@both
def test_var_task_cannot_be_remounted_read_write(probed: Probed, who: str) -> None:
    found = probe(probed, who, "remount")
    assert found["before"] is True
    assert found["binary"]["rc"] == 32, found["binary"]  # mount(8): "mount failure"
    assert "must be superuser" in found["binary"]["err"]
    assert found["syscall"] == errno.EPERM  # mount(2) MS_REMOUNT|MS_BIND, denied by the seccomp filter
    assert found["tmpfs_over"] == errno.EPERM
    assert found["after"] is True
    assert found["write_after"] == errno.EROFS


@both
def test_no_namespace_can_be_made_or_joined(probed: Probed, who: str) -> None:
    found = probe(probed, who, "namespaces")
    for flag in ("unshare_U", "unshare_m"):
        assert found[flag]["rc"] == 1, found[flag]
        assert found[flag]["err"] == "unshare: unshare failed: Operation not permitted"
    assert found["unshare_user_call"] == found["unshare_mnt_call"] == errno.EPERM
    assert found["setns_init_mnt"] == {"open": errno.EACCES}  # init's namespaces: ptrace access is needed
    assert found["setns_own_mnt"] == {"open": 0, "setns": errno.EPERM}  # setns(2) itself: the seccomp filter
    shared = [ns for ns in HOST_NAMESPACES if found["links"][ns] == os.readlink(f"/proc/self/ns/{ns}")]
    assert shared == []  # IPC and UTS too: the host's message queues and (through /proc/sys) hostname are not its


@both
def test_the_memory_cgroup_cannot_be_left(probed: Probed, who: str) -> None:
    found = probe(probed, who, "cgroups")
    assert found["tried"], "no cgroup.procs under /sys/fs/cgroup"
    assert set(found["tried"].values()) == {errno.EROFS}, found["tried"]
    assert found["after"] == found["before"]
    if probed.memory_cgroup is not None:
        assert found["before"].split(":", 2)[2] == probed.memory_cgroup


@both
def test_host_processes_are_out_of_reach(probed: Probed, who: str) -> None:
    found = probe(probed, who, "processes")
    assert found["kill"] == found["kill_term"] == errno.ESRCH  # the test's own pid: not in the PID namespace
    assert found["ptrace"] == errno.ESRCH
    assert found["ptrace_init"] == errno.EPERM  # init has capabilities (in the user namespace); the probe none
    assert found["init"] == dict.fromkeys(found["init"], errno.EACCES)  # no ptrace access to init: nor to these
    pids = found["pids"]
    assert pids[0] == 1 and found["own_pid"] in pids
    assert len(pids) <= 8, pids  # init, the runtime, the extension (and the extension's daemon): not the host's
    assert len([p for p in os.listdir("/proc") if p.isdigit()]) > len(pids)


def test_a_daemon_does_not_outlive_the_environment(probed: Probed) -> None:
    for who in WHO:
        assert probe(probed, who, "daemon")["pid"] > 1
    assert sorted(argv[-1] for argv in probed.daemons.values()) == sorted(WHO.values())  # both ran meanwhile
    assert probed.daemons_left == {}


@both
def test_tmp_is_ephemeral_storage_sized_and_full_at_512_mb(probed: Probed, who: str) -> None:
    found = probe(probed, who, "fill_tmp")
    assert found["size"] == 512 * MIB
    assert found["errno"] == errno.ENOSPC
    assert 511 * MIB <= found["written"] <= 512 * MIB


@both
def test_open_files_stop_at_1024(probed: Probed, who: str) -> None:
    found = probe(probed, who, "files")
    assert found["limit"] == [1024, 1024]
    assert found["errno"] == errno.EMFILE
    assert found["highest"] == 1023  # every descriptor below the limit taken, none above
    assert found["raise"] == "not allowed to raise maximum limit"  # setrlimit(2): EPERM


@both
def test_no_privileges(probed: Probed, who: str) -> None:
    found = probe(probed, who, "privileges")
    zero = "0000000000000000"
    assert found["status"] == {
        "CapInh": zero, "CapPrm": zero, "CapEff": zero, "CapBnd": zero, "CapAmb": zero, "NoNewPrivs": "1",
        "Seccomp": "2",
    }  # fmt: skip
    assert found["uid"] == [993, 993, 990, 990]
    assert (found["id_u"], found["id_un"]) == ("993", "sbx_user1051")
    assert probe(probed, who, "sysctls")["sethostname"] == errno.EPERM


@both
def test_kernel_settings_cannot_be_opened_for_writing(probed: Probed, who: str) -> None:
    opened = probe(probed, who, "sysctls")["open_for_write"]
    # EACCES as any user but root, in Lambda; ENOENT for a file this kernel lacks (/proc/sysrq-trigger without
    # CONFIG_MAGIC_SYSRQ, /proc/sys/kernel/modprobe without CONFIG_MODULES)
    assert opened == {path: errno.EACCES if os.path.exists(path) else errno.ENOENT for path in opened}


@both
def test_the_hosts_message_queues_are_out_of_reach(probed: Probed, who: str) -> None:
    assert probe(probed, who, "host_ipc")["msgget"] == errno.ENOENT  # no such queue in an IPC namespace of its own


@both
def test_the_hosts_unix_sockets_are_out_of_reach(probed: Probed, who: str) -> None:
    # ENOENT where the host's tree is not visible (as in Lambda); EACCES where it is but the user is not root
    assert probe(probed, who, "host_socket")["connect"] in (errno.ENOENT, errno.EACCES)
    assert [c for c in probed.bait.connections if c["said"] == WHO[who]] == []


@both
def test_device_nodes_on_the_hosts_tree_cannot_be_opened(probed: Probed, who: str) -> None:
    # ENOENT where the host's tree is not visible (as in Lambda); EACCES where it is, to a user not root outside
    assert probe(probed, who, "host_device")["open"] in (errno.ENOENT, errno.EACCES)


@both
def test_a_kept_host_directory_is_read_only(probed: Probed, who: str) -> None:
    if probed.kept is None:
        pytest.skip("no runtime cache to copy under /tmp")
    assert probe(probed, who, "writes")["create"][str(probed.kept)] == errno.EROFS
    assert probed.kept_files == []


# ---- memory, and tasks ---------------------------------------------------------------------------------------------


@needs_memory_cgroup
@both
def test_allocating_past_memory_size_is_out_of_memory_and_the_next_invoke_works(tmp_path: Path, who: str) -> None:
    environment = {"ESCAPE_EXT_HOG": "300"} if who == "extension" else {}
    config = escape_function(tmp_path, environment, memory_mb=128)
    event = {"hog": 300} if who == "function" else {}

    async def go() -> tuple[InvokeResult, InvokeResult]:
        async with open_environment(config) as env:
            return await invoke(env, event), await invoke(env, {"probes": []})

    hogged, after = run(go(), RUN_S)
    assert (hogged.report.status, hogged.report.error_type) == ("failure", "Runtime.OutOfMemory"), hogged.report
    assert hogged.report.max_memory_used_mb <= 128
    if who == "function" or not isinstance(hogged.outcome, Response):  # the function answers in a ms, usually
        assert isinstance(hogged.outcome, LambdaFailure), hogged.outcome  # before the extension is killed
        assert hogged.outcome.error_type == "Runtime.OutOfMemory"
    assert body(after) == {}
    assert after.report.status == "success" and after.report.init_duration_ms is not None  # initialised again


@pytest.mark.cgroup2
@pytest.mark.skipif(HIERARCHY != "v2", reason="pids.max is set on cgroup v2 only")
def test_threads_stop_at_1024_tasks(tmp_path: Path) -> None:
    # The bash extension: two Pythons starting one after the other (extension, then runtime) take most of Init's
    # 10 s on the emulated machine that runs this test on a cgroup v1 host.
    config = escape_function(tmp_path, {}, memory_mb=1024, ext_probes=["threads"], ext_script="threads_ext.sh")
    recorder = Recorder()

    async def go() -> list[InvokeResult]:
        async with open_environment(config, None, [recorder]) as env:
            return [await invoke(env, {"probes": probes}) for probes in ([], ["threads"], [])]

    first, second, third = run(go(), RUN_S)
    said = recorder.extension_says("probes")
    assert said, (recorder.lines(), first.report, second.report, third.report)
    assert first.report.status == "success", first.report  # the extension probed
    for found in (said[0]["results"]["threads"], body(second)["threads"]):
        assert found["refused"] == "can't start new thread", found
        assert found["cgroup"] == {"pids.max": "1024", "pids.current": "1024"}
        assert 1000 <= found["started"] < 1024
    assert body(third) == {}
