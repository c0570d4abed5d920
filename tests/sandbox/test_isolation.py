"""Isolation: mount namespace (layout, /etc/hosts, kept paths), network namespace (only lo, up), cgroups (limit,
peak, OOM, freezer), teardown, and the degraded mode."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from lambdabox.core.errors import SandboxError
from lambdabox.loop import run as run_loop
from lambdabox.sandbox import cgroups as cgroups_module
from lambdabox.sandbox import namespace, outbound
from lambdabox.sandbox.cgroups import CGROUP_ROOT
from lambdabox.sandbox.isolation import Isolation, open_isolation
from lambdabox.sandbox.namespace import Layout
from lambdabox.sandbox.netns import NetNamespace
from lambdabox.sandbox.processes import OwnedProcess
from support import host_cgroups

T = TypeVar("T")
PY = sys.executable
FULL = host_cgroups() is not None
needs_full = pytest.mark.skipif(not FULL, reason="needs root and cgroups (v2, or v1 memory and freezer)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_loop(coro)


def make_layout(root: Path, keep: tuple[Path, ...] = ()) -> Layout:
    """A layout whose processes can run this interpreter (kept visible even when it lies under /tmp)."""
    interpreter = (Path(sys.prefix), Path(sys.base_prefix))
    layout = Layout(task=root / "task", opt=root / "opt", tmp=root / "tmp", keep=(*interpreter, *keep))
    for d, marker in ((layout.task, "handler.py"), (layout.opt, "layer.txt"), (layout.tmp, "scratch.txt")):
        d.mkdir(parents=True)
        (d / marker).write_text(marker)
    return layout


async def spawn(iso: Isolation, code: str, records: list[str], cwd: str = "/var/task") -> OwnedProcess:
    proc = await OwnedProcess.start(
        iso.command([PY, "-c", code], cwd=cwd),
        env=dict(os.environ),
        cwd=iso.host_cwd(cwd),
        label="fn",
        on_record=lambda _label, text: records.append(text),
    )
    iso.register(proc.pid)
    return proc


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


COUNTER = (
    "import os, time\n"
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    "    with open('{tmp}/counter.new', 'w') as f: f.write(str(i))\n"
    "    os.replace('{tmp}/counter.new', '{tmp}/counter')\n"
    "    time.sleep(0.001)\n"
)


@needs_full
def test_namespace_shows_layout_hosts_and_kept_paths(tmp_path: Path) -> None:
    kept = tmp_path / "kept-venv"  # lies under the host's /tmp, which the layout's tmp hides
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
        "  'tmp': sorted(os.listdir('/tmp')), 'cwd': os.getcwd(),\n"
        f"  'kept': open({str(kept / 'marker')!r}).read(),\n"
        "  'ip': socket.gethostbyname('sandbox.localdomain'), 'ip2': socket.gethostbyname('sandbox'),\n"
        "  'task_w': writable('/var/task/x'), 'opt_w': writable('/opt/x'), 'tmp_w': writable('/tmp/x')}))\n"
    )

    async def body() -> tuple[dict[str, Any], Isolation]:
        records: list[str] = []
        async with open_isolation(layout, memory_mb=256, name="ns") as iso:
            assert iso.degraded == ()
            assert iso.net_namespace is not None and f"--net={iso.net_namespace}" in iso.command(["x"])
            assert iso.path("/opt/extensions") == "/opt/extensions"
            assert await (await spawn(iso, code, records)).wait_exit() == 0, records
        return json.loads(records[-1]), iso

    seen, _ = run(body())
    assert seen["task"] == ["handler.py"]
    assert seen["opt"] == ["layer.txt"]
    assert "scratch.txt" in seen["tmp"]
    assert seen["cwd"] == "/var/task"
    assert seen["kept"] == "kept"
    assert seen["ip"] == seen["ip2"] == "127.0.0.1"
    assert (seen["task_w"], seen["opt_w"], seen["tmp_w"]) == (False, False, True)
    assert (layout.tmp / "x").exists()  # the environment's /tmp is the layout's tmp dir
    assert not Path("/opt/layer.txt").exists()  # nothing leaked into the host's mount table
    assert "sandbox.localdomain" not in Path("/etc/hosts").read_text()


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
    layout = make_layout(tmp_path)

    async def body() -> tuple[int, int, int]:
        async with open_isolation(layout, memory_mb=256, name="freeze") as iso:
            return await _freeze_roundtrip(iso, layout.tmp / "counter", "/tmp")

    frozen_at, still, resumed = run(body())
    assert still == frozen_at
    assert resumed > still


@needs_full
@pytest.mark.cgroup2
def test_everything_is_gone_after_the_context_exits(tmp_path: Path) -> None:
    async def body() -> tuple[list[Path], list[int], Path | None, int, int]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="gone") as iso:
            records: list[str] = []
            proc = await spawn(iso, "import time; print('up', flush=True); time.sleep(600)", records)
            await poll_until(lambda: "up" in records)
            assert iso.pids() == [proc.pid]
            assert iso.cgroups is not None
            cgroups = list(iso.cgroups.paths())  # a memory and a freezer cgroup on v1, one cgroup on v2
            assert len(cgroups) == {"v1": 2, "v2": 1}[iso.cgroups.hierarchy] and all(c.is_dir() for c in cgroups)
            mnt = iso._namespace.mnt_path
            assert mnt is not None and iso.net_namespace is not None
            hosts, net, mnt_ino = iso._namespace.files_dir, os.stat(iso.net_namespace).st_ino, os.stat(mnt).st_ino
            left = iso.pids()
        assert await wait_exit(proc) == -signal.SIGKILL  # killed by the teardown
        return cgroups, left, hosts, net, mnt_ino

    cgroups, left, hosts, net, mnt = run(body())
    for ino in (net, mnt):  # no process is in the namespaces and no descriptor holds them: they are gone
        assert not [t for t in Path("/proc").glob("[0-9]*/task/*/ns/*") if _inode(t) == ino]
        assert not [f for f in Path(f"/proc/{os.getpid()}/fd").iterdir() if _inode(f) == ino]
    assert not any(c.exists() for c in cgroups)
    assert all(not psutil.pid_exists(p) for p in left)
    assert hosts is not None and not hosts.exists()
    for parent in (CGROUP_ROOT / "memory", CGROUP_ROOT / "lambdabox"):  # v1's memory controller, v2's own subtree
        if parent.is_dir():
            assert not [d for d in parent.iterdir() if "gone-" in d.name]


@needs_full
@pytest.mark.cgroup2
def test_teardown_also_when_the_body_raises(tmp_path: Path) -> None:
    seen: list[Path] = []

    async def body() -> None:
        procs: list[OwnedProcess] = []
        try:
            async with open_isolation(make_layout(tmp_path), memory_mb=128, name="raise") as iso:
                assert iso.cgroups is not None
                seen.extend(iso.cgroups.paths())
                procs.append(await spawn(iso, "import time; time.sleep(600)", []))
                raise RuntimeError("boom")
        finally:
            # Killed by the teardown, or, had it not got in yet, refused by the removed cgroup (sh: 2)
            # or the stopped namespace (nsenter: 1): it never outlives the environment.
            codes = [await p.wait_exit() for p in procs]
            assert len(codes) == 1 and codes[0] in (-signal.SIGKILL, 1, 2), codes

    with pytest.raises(RuntimeError, match="boom"):
        run(body())
    assert seen and not seen[0].exists()


def test_degraded_mode_maps_paths_freezes_by_signal_and_samples_memory(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    alloc = "import time\nblob = b'x' * (50 << 20)\nprint('allocated', flush=True)\ntime.sleep(600)\n"

    async def body() -> tuple[Isolation, tuple[int, int, int], int, int, list[int]]:
        async with open_isolation(layout, memory_mb=128, name="deg", isolate=False) as iso:
            assert iso.command(["x", "y"]) == ["x", "y"]
            assert iso.path("/opt/extensions") == str(layout.opt / "extensions")
            assert iso.path("/var/task") == str(layout.task)
            assert iso.path("/etc/passwd") == "/etc/passwd"
            assert iso.host_cwd() == str(layout.task)
            counts = await _freeze_roundtrip(iso, layout.tmp / "counter", str(layout.tmp))
            base = iso.peak_memory_bytes()
            records: list[str] = []
            hog = await spawn(iso, alloc, records)
            await poll_until(lambda: "allocated" in records)
            peak = iso.peak_memory_bytes()
            pids = iso.pids()
            assert hog.pid in pids
            await iso.kill_all()
            assert await hog.wait_exit() == -signal.SIGKILL
            assert not (iso.oom_kill_count() > 0)
        return iso, counts, base, peak, pids

    iso, (frozen_at, still, resumed), base, peak, _ = run(body())
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
            records: list[str] = []
            proc = await spawn(iso, "import os; print(os.listdir('/var/task'), os.getcwd())", records, "/opt")
            assert await proc.wait_exit() == 0, records
            counts = await _freeze_roundtrip(iso, layout.tmp / "counter", "/tmp")
            return iso.degraded, records, counts

    degraded, records, (frozen_at, still, resumed) = run(body())
    assert records == ["['handler.py'] /opt"]
    assert any(d.startswith("no memory limit") for d in degraded)
    assert not any("mount namespace" in d for d in degraded)
    assert still == frozen_at and resumed > still


@needs_full
def test_cgroups_without_namespace_when_the_namespace_setup_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object) -> None:
        raise OSError(errno.EPERM, "mount /var/task: Operation not permitted")

    monkeypatch.setattr(namespace, "_enter_and_mount", refused)
    layout = make_layout(tmp_path)

    async def body() -> tuple[tuple[str, ...], list[int], int, list[str]]:
        async with open_isolation(layout, memory_mb=128, name="nons") as iso:
            records: list[str] = []
            proc = await spawn(iso, "import os, time; print(os.getcwd(), flush=True); time.sleep(600)", records)
            await poll_until(lambda: bool(records))
            pids = iso.pids()
            await iso.kill_all()
            return iso.degraded, pids, await proc.wait_exit(), records

    degraded, pids, rc, records = run(body())
    assert "no mount namespace (namespace setup failed: mount /var/task: Operation not permitted)" in degraded[0]
    assert "no network namespace (namespace setup failed: mount /var/task: Operation not permitted)" in degraded[-1]
    assert not any("memory limit" in d for d in degraded)
    assert len(pids) == 1
    assert rc == -signal.SIGKILL
    assert records == [str(layout.task)]


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


NET_PROBE = (
    "import json, os, socket\n"
    "listener = socket.create_server(('127.0.0.1', 0))\n"
    "client = socket.create_connection(listener.getsockname(), timeout=5)\n"  # lo is up
    "print(json.dumps({'ifs': socket.if_nameindex(), 'net': os.stat('/proc/self/ns/net').st_ino}))\n"
)


@needs_full
def test_a_process_inside_sees_lo_up_and_the_outbound_interface(tmp_path: Path) -> None:
    async def body() -> tuple[dict[str, Any], int, int, tuple[str, ...]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="net") as iso:
            records: list[str] = []
            assert await (await spawn(iso, NET_PROBE, records)).wait_exit() == 0, records
            assert iso.net_namespace is not None
            with NetNamespace(iso.net_namespace) as ns:
                return json.loads(records[-1]), os.stat(iso.net_namespace).st_ino, ns.inode, iso.degraded

    seen, net, thread_net, degraded = run(body())
    assert seen["ifs"] == [[1, "lo"], [2, "tap0"]] and degraded == ()
    assert seen["net"] == net == thread_net != os.stat("/proc/self/ns/net").st_ino


def outbound_probe(port: int) -> str:
    """Code that greets the server at ``port`` of the machine by each of its names, and reads the resolver."""
    return (
        "import json, socket\n"
        "got = {}\n"
        "for name in ('host.lambdabox.internal', 'host.docker.internal'):\n"
        f"    with socket.create_connection((name, {port}), timeout=5) as s:\n"
        "        got[name] = s.recv(64).decode()\n"
        "got['resolv'] = [l for l in open('/etc/resolv.conf') if l.startswith('nameserver')]\n"
        "print(json.dumps(got))\n"
    )


async def _greeting_server() -> asyncio.Server:
    """A TCP server on the host's loopback that greets each connection with its peer's address."""

    async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"hello {writer.get_extra_info('peername')[0]}".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(greet, "127.0.0.1", 0)


@needs_full
@pytest.mark.skipif(outbound.probe() is not None, reason="needs slirp4netns")
def test_the_environment_reaches_a_server_on_the_host_loopback_by_name(tmp_path: Path) -> None:
    async def body() -> tuple[list[str], int | None]:
        server = await _greeting_server()
        port = server.sockets[0].getsockname()[1]
        async with server, open_isolation(make_layout(tmp_path), memory_mb=128, name="out") as iso:
            records: list[str] = []
            proc = await spawn(iso, outbound_probe(port), records)
            assert await proc.wait_exit() == 0, records
            slirp = iso._outbound._process
            pid = slirp.pid if slirp is not None else None
        return records, pid

    records, slirp = run(body())
    seen = json.loads(records[-1])
    # slirp4netns connects from the host's loopback on the environment's behalf, as Lambda's NAT would
    assert seen["host.lambdabox.internal"] == seen["host.docker.internal"] == "hello 127.0.0.1"
    assert seen["resolv"] == [f"nameserver {outbound.DNS_ADDRESS}\n"]
    assert slirp is not None and not psutil.pid_exists(slirp)  # ended with the environment


@needs_full
def test_without_slirp4netns_only_loopback_and_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "probe", lambda: "slirp4netns not found")

    async def body() -> tuple[tuple[str, ...], list[str]]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="noout") as iso:
            records: list[str] = []
            code = NET_PROBE + "print(open('/etc/hosts').read().count('host.lambdabox.internal'))\n"
            assert await (await spawn(iso, code, records)).wait_exit() == 0, records
            return iso.degraded, records

    degraded, records = run(body())
    assert json.loads(records[0])["ifs"] == [[1, "lo"]] and records[1] == "0"
    assert degraded == (
        "no outbound network (slirp4netns not found): the environment reaches only its own loopback, not the "
        "internet nor this machine (install slirp4netns, or use the host's network)",
    )


@needs_full
def test_network_false_keeps_the_host_network_and_says_so(tmp_path: Path) -> None:
    async def body() -> tuple[Isolation, list[str], list[str]]:
        server = await _greeting_server()
        port = server.sockets[0].getsockname()[1]
        async with server, open_isolation(make_layout(tmp_path), memory_mb=128, name="nonet", network=False) as iso:
            records: list[str] = []
            argv = iso.command(["x"])
            assert await (await spawn(iso, NET_PROBE, records)).wait_exit() == 0, records
            proc = await spawn(iso, outbound_probe(port), records)
            assert await proc.wait_exit() == 0, records
            return iso, records, argv

    iso, records, argv = run(body())
    assert iso.net_namespace is None and not any(a.startswith("--net") for a in argv)
    assert json.loads(records[0])["net"] == os.stat("/proc/self/ns/net").st_ino
    seen = json.loads(records[1])  # the machine's names are its own loopback here
    assert seen["host.lambdabox.internal"] == seen["host.docker.internal"] == "hello 127.0.0.1"
    assert len(iso.degraded) == 1 and iso.degraded[0].startswith("no network namespace (network=False): ")


@needs_full
def test_a_network_namespace_that_fails_leaves_the_mount_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = namespace._loopback_up

    def no_lo() -> None:
        real()  # lo is up in this thread's new network namespace, then it fails all the same
        raise OSError(errno.EPERM, "cannot bring lo up")

    monkeypatch.setattr(namespace, "_loopback_up", no_lo)

    async def body() -> tuple[tuple[str, ...], list[str], str | None]:
        async with open_isolation(make_layout(tmp_path), memory_mb=128, name="netfail") as iso:
            records: list[str] = []
            proc = await spawn(iso, "import os; print(os.listdir('/var/task'))", records)
            assert await proc.wait_exit() == 0, records
            return iso.degraded, records, iso.net_namespace

    degraded, records, net = run(body())
    assert records == ["['handler.py']"] and net is None
    assert degraded == (
        "no network namespace (namespace setup failed: cannot bring lo up): the Runtime API is at a port of its "
        "own on 127.0.0.1, not 127.0.0.1:9001, and extensions share the host's ports",
    )
