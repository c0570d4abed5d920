"""Owns lambdabox's side of an environment's holder (:mod:`lambdabox.sandbox.holder`): starting it (or taking one
started ahead, :class:`Spares`), handing it the configuration, starting processes through it (:class:`HeldProcess`,
with their exits as the holder's init reports them), making sockets in the environment's network namespace, and
ending it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambdabox.core.errors import SandboxError
from lambdabox.loop import open_task_group
from lambdabox.sandbox import holder as protocol
from lambdabox.sandbox import leftovers
from lambdabox.sandbox.helper import Helper, spawn_helper

_PACKAGES = str(Path(protocol.__file__).parents[2])  # where lambdabox is imported from
COMMAND = (
    sys.executable,
    "-I",
    "-S",
    "-c",
    f"import sys; sys.path.insert(0, {_PACKAGES!r}); from lambdabox.sandbox import holder; holder.main()",
)
"""The holder's command line (then the two sockets' descriptor numbers): only the standard library and this
package's stdlib-only modules are imported, from their cached bytecode, so it starts in a few milliseconds."""
DEADLINE_S = 5.0
"""Bound on every wait: the holder ready, a process started, a socket made, the holder gone."""
REFILL_S = 0.25
"""After a spare is taken, the next is started this much later (see :class:`Spares`)."""
TELEMETRY_TARGET = 3  # the descriptor number a process gets awslambdaric's telemetry pipe at


@dataclass(frozen=True)
class IdMap:
    """Lambda's user inside the user namespace (``uid``, ``gid``) and who it is outside: the user who runs
    lambdabox, or, for root, an unprivileged user (so that nothing inside has root's rights over the host's files)."""

    uid: int
    gid: int
    outer_uid: int
    outer_gid: int

    def write(self, pid: int) -> None:
        """Write the id maps of ``pid``'s user namespace (from outside it: a map naming another user than the
        writer's own takes a writer with CAP_SETUID there)."""
        Path(f"/proc/{pid}/setgroups").write_text("deny")
        Path(f"/proc/{pid}/uid_map").write_text(f"{self.uid} {self.outer_uid} 1")
        Path(f"/proc/{pid}/gid_map").write_text(f"{self.gid} {self.outer_gid} 1")


class HeldProcess:
    """A process the holder started: its host pid (a session leader: signal its group), its exit as init saw it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _exit(self, returncode: int) -> None:
        if not self._exited.done():
            self.returncode = returncode
            self._exited.set_result(returncode)


class Holder:
    """One running holder. Messages from init arrive on the control socket (read by the event loop); sockets are
    made over a second socket, synchronously, for callers that cannot wait (an HTTP client's socket factory)."""

    def __init__(self, process: Helper, control: socket.socket, sockets: socket.socket) -> None:
        self.process = process
        self.init_pid: int | None = None  # init's pid on the host, once known
        self._control = control
        self._sockets = sockets
        self._sockets_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._processes: dict[int, HeldProcess] = {}  # by pid inside
        self._host_pids: dict[int, int] = {}  # by spawn request, from the process's own message
        self._closed = False
        self._start: asyncio.Queue[tuple[dict[str, Any], list[int]]] = asyncio.Queue()
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(control.fileno(), self._readable)

    @property
    def net_path(self) -> str | None:
        return None if self.init_pid is None else f"/proc/{self.init_pid}/ns/net"

    @property
    def user_path(self) -> str | None:
        return None if self.init_pid is None else f"/proc/{self.init_pid}/ns/user"

    def root(self, path: str) -> str:
        """The host's path to ``path`` inside the environment (through init's root)."""
        return f"/proc/{self.init_pid}/root{path}"

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str, fds: Mapping[int, int], *, ahead: bool = False
    ) -> HeldProcess:
        """Start ``argv`` inside, with ``fds`` (target number: descriptor here) in place of stdout, stderr...;
        ``ahead``: another process will be started after it (the holder gets that one's process ready)."""
        ident = next(self._ids)
        message = {"spawn": ident, "argv": list(argv), "env": dict(env), "cwd": cwd, "fds": list(fds), "ahead": ahead}
        reply, _ = await self._request(f"spawned:{ident}", message, list(fds.values()))
        if "error" in reply:
            raise OSError(f"cannot start {argv[0]}: {reply['error']}")
        process: HeldProcess = reply["process"]
        return process

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A new socket in the environment's network namespace."""
        reply, fds = self._ask({"socket": [int(family), int(type), int(proto)]})  # (marshal: no enums)
        if reply is None or not fds:
            raise OSError("the environment's holder made no socket")
        return socket.socket(fileno=fds[0])

    def show(self, source: str, target: str) -> None:
        """Show the directory ``source`` read-only at ``target`` (/var/lang or /var/runtime) inside."""
        reply, _ = self._ask({"show": [source, target]})
        if reply is None or "shown" not in reply:
            raise OSError(reply["error"] if reply else "the environment's holder is gone")

    def _ask(self, message: dict[str, Any]) -> tuple[dict[str, Any] | None, list[int]]:
        """One request and its answer (and the descriptors passed with it) over the socket for requests that do
        not wait for the event loop; None once the holder is closed."""
        with self._sockets_lock:
            if self._closed:
                return None, []
            self._sockets.settimeout(DEADLINE_S)
            protocol.send(self._sockets, message)
            return protocol.receive(self._sockets)

    def kill_all(self) -> None:
        """Have init SIGKILL every other process of the PID namespace (kill(-1) from init), orphans included."""
        with contextlib.suppress(OSError, TimeoutError):
            self._ask({"kill": int(signal.SIGKILL)})

    async def first(self) -> tuple[dict[str, Any], list[int]]:
        """The next message of the holder's start-up: ``init``, then ``ready`` or ``error``."""
        got = asyncio.ensure_future(self._start.get())
        try:
            await _first_of(got, self._lost)
        finally:
            got.cancel()
        if not got.done() or got.cancelled():
            lost = self._lost.done()
            raise OSError("the holder ended while starting" if lost else f"the holder not ready after {DEADLINE_S}s")
        return got.result()

    async def _request(self, key: str, message: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        if self._closed:
            raise OSError("the environment's holder is gone")
        waiter: asyncio.Future[tuple[dict[str, Any], list[int]]] = asyncio.get_running_loop().create_future()
        self._replies[key] = waiter
        try:
            protocol.send(self._control, message, fds)
            await _first_of(waiter, self._lost)
        finally:
            self._replies.pop(key, None)
        if not waiter.done():
            what = "the holder ended" if self._lost.done() else "no answer"
            raise OSError(f"the environment's holder: {what} to {message}")
        return waiter.result()

    def _readable(self) -> None:
        try:
            message, fds = protocol.receive(self._control)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fds = None, []
        if message is None:
            self._lose()
            return
        if "exited" in message:
            if (process := self._processes.pop(message["exited"], None)) is not None:
                process._exit(os.waitstatus_to_exitcode(message["status"]))
            return
        if "started" in message:  # from the new process itself, so "sender" is its host pid
            self._host_pids[message["started"]] = message["sender"]
            return
        if "spawned" not in message:
            self._start.put_nowait((message, fds))
            return
        host_pid = self._host_pids.pop(message["spawned"], None)
        if "pid" in message and host_pid is not None:  # known before its exit can be read (the next message)
            process = self._processes[message["pid"]] = HeldProcess(host_pid)
            message = {**message, "process": process}
        elif "pid" in message:
            message = {"spawned": message["spawned"], "error": "the holder did not say its pid"}
        waiter = self._replies.get(f"spawned:{message['spawned']}")
        if waiter is not None and not waiter.done():  # (else its caller gave up)
            waiter.set_result((message, []))

    def _lose(self) -> None:
        """The control socket closed: init is gone, and every process of the PID namespace with it."""
        if self._lost.done():
            return
        self._lost.set_result(None)
        asyncio.get_running_loop().remove_reader(self._control.fileno())
        for process in self._processes.values():
            process._exit(-signal.SIGKILL)
        self._processes.clear()

    async def close(self) -> None:
        """End init (the PID namespace and everything in it) and the holder, within the deadline (idempotent)."""
        if not self._closed:
            with self._sockets_lock:
                self._closed = True
                self._lose()
                self._control.close()
                self._sockets.close()
        try:
            await asyncio.wait_for(self.process.wait(), DEADLINE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            if self.init_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            await asyncio.wait_for(self.process.wait(), DEADLINE_S)


@dataclass
class Spawned:
    """A holder started and not yet configured: it waits for its configuration on ``control`` (its first message),
    writing to ``files``/holder.log; it exits when ``control`` closes."""

    process: Helper
    control: socket.socket
    sockets: socket.socket
    files: Path

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def discard(self) -> None:
        """End it (it reads the closed socket and exits), reaped."""
        self.control.close()
        self.sockets.close()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            try:
                await asyncio.wait_for(self.process.wait(), DEADLINE_S)
            except TimeoutError:
                self.process.kill()
                await asyncio.wait_for(self.process.wait(), DEADLINE_S)

    async def drop(self) -> None:
        """:meth:`discard` it and remove its files (a spare nobody took)."""
        await self.discard()
        leftovers.remove_tree(self.files)


async def spawn_holder(files: Path) -> Spawned:
    """Start a holder, which then waits for its configuration (:func:`start_holder`)."""
    control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sockets, sockets_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with (files / "holder.log").open("ab") as out:
            process = spawn_helper(
                [*COMMAND, str(control_theirs.fileno()), str(sockets_theirs.fileno())],
                output=out.fileno(),
                pass_fds=(control_theirs.fileno(), sockets_theirs.fileno()),
            )
    except BaseException:
        control.close()
        sockets.close()
        raise
    finally:
        control_theirs.close()
        sockets_theirs.close()
    return Spawned(process, control, sockets, files)


async def start_holder(
    config: dict[str, Any], cgroup_procs: Sequence[Path], ids: IdMap, spawned: Spawned
) -> tuple[Holder, list[int]]:
    """Configure the ``spawned`` holder with ``config`` (see :mod:`lambdabox.sandbox.holder`), its processes joining
    the cgroups whose ``cgroup.procs`` are given, Lambda's user mapped as ``ids`` says; the holder, ready, and the
    descriptors it sent (the Runtime API's listener). Raises SandboxError saying why it could not be had."""
    process, control, sockets, log = spawned.process, spawned.control, spawned.sockets, spawned.files / "holder.log"
    cgroup_fds: list[int] = []
    holder: Holder | None = None
    try:
        cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup_procs]
        control.setblocking(False)
        control.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # each new process's host pid
        holder = Holder(process, control, sockets)
        message = {**config, "parent": os.getpid(), "cgroups": len(cgroup_fds)}
        protocol.send(control, message, cgroup_fds)
        message, _ = await holder.first()
        if "unshared" not in message:
            raise SandboxError(message.get("error", f"unexpected {message}"))
        ids.write(process.pid)
        protocol.send(control, {"mapped": True})
        ready: list[int] | None = None
        while holder.init_pid is None or ready is None:  # the holder says init, and init ready: two processes,
            message, passed = await holder.first()  # so in either order
            if "init" in message:
                holder.init_pid = message["init"]
            elif "ready" in message:
                ready = passed
            else:
                raise SandboxError(message.get("error", f"unexpected {message}"))
        fds = ready
    except BaseException as error:
        if holder is not None:
            with contextlib.suppress(Exception):
                await holder.close()
        else:
            with contextlib.suppress(Exception):
                await spawned.discard()
        if isinstance(error, OSError):
            said = log.read_text(errors="replace").strip().splitlines()
            raise SandboxError(f"{error}{': ' + said[-1] if said else ''}") from None
        raise
    finally:
        for fd in cgroup_fds:
            os.close(fd)
    return holder, fds


class Spares:
    """A holder started ahead, for the next environment to take: its interpreter's start (about 10 ms) is then off
    that environment's cold start. :meth:`fill` starts the first; one taken is replaced REFILL_S later, by a task of
    ``group``: starting a process holds the event loop for a millisecond or two (the fork of lambdabox's own
    process), which would otherwise fall inside the taker's own opening. Nothing but lambdabox's own holder is
    started ahead: the environment's processes start at its Init, as in Lambda. Use :func:`open_spares`."""

    def __init__(self, group: asyncio.TaskGroup, files: Callable[[], Path]) -> None:
        self._group = group
        self._files = files
        self._spare: Spawned | None = None
        self._coming: asyncio.Task[None] | None = None  # a spare being started
        self._refill: asyncio.TimerHandle | None = None
        self._closed = False

    def fill(self) -> None:
        """Start a holder ahead (a task of the group), unless one is ready or being started."""
        if not self._closed and self._spare is None and self._coming is None:
            self._coming = self._group.create_task(self._replenish())

    async def take(self) -> Spawned:
        """The spare (the one being started, once it is; or, none being there, one started now); another is
        started for the next taker."""
        if self._spare is None and self._coming is not None:
            await asyncio.wait({self._coming}, timeout=DEADLINE_S)  # (it never raises)
        spare, self._spare = self._spare, None
        if self._refill is None and not self._closed:
            self._refill = asyncio.get_running_loop().call_later(REFILL_S, self._refill_now)
        if spare is not None and spare.alive:
            return spare
        if spare is not None:
            await spare.drop()
        return await self._spawn()

    def _refill_now(self) -> None:
        self._refill = None
        self.fill()

    async def _spawn(self) -> Spawned:
        files = self._files()
        try:
            return await spawn_holder(files)
        except BaseException:
            leftovers.remove_tree(files)
            raise

    async def _replenish(self) -> None:
        try:
            spare = await self._spawn()
        except Exception:  # (a task of the group: it never raises) the next taker starts one itself
            return
        finally:
            self._coming = None
        if self._closed or self._spare is not None:
            await spare.drop()
        else:
            self._spare = spare

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.drop()


@contextlib.asynccontextmanager
async def open_spares(files: Callable[[], Path]) -> AsyncIterator[Spares]:
    """:class:`Spares` (``files()`` makes each holder's directory) for the block; on exit the spare is ended."""
    async with open_task_group() as group:
        spares = Spares(group, files)
        try:
            yield spares
        finally:
            await spares.close()


async def _first_of(*futures: asyncio.Future[Any]) -> None:
    """Wait until one of ``futures`` is done, at most DEADLINE_S."""
    await asyncio.wait(set(futures), timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
