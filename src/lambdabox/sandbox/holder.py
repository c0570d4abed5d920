"""Owns the holder: the small process that makes one environment's namespaces (user, mount, PID and network) and is
init (PID 1) inside them. It builds Lambda's filesystem (:mod:`lambdabox.sandbox.rootfs`), starts each of the
environment's processes when lambdabox asks, as Lambda's user with Lambda's limits, reaps every process and reports
the exits. Run by :data:`lambdabox.sandbox.held.COMMAND`, as ``python -I -S`` (the standard library and this
package's ``syscalls``, ``rootfs`` and ``seccomp``, from their cached bytecode): a fresh single-threaded process, so
it may make a user namespace, which lambdabox's own threaded process may not. Lambdabox's side is
:mod:`lambdabox.sandbox.held`.

The protocol, one dict (``marshal``: the peer is the same interpreter) per SOCK_SEQPACKET message on the control
socket (the first argument; the second is the socket for :meth:`Holder.socket`), descriptors alongside:
- lambdabox's first message is the configuration (descriptors: the cgroups' ``cgroup.procs``, opened by
  lambdabox); the holder unshares and says ``{"unshared": true}``, lambdabox writes the user
  namespace's id maps and answers ``{"mapped": true}``; the holder answers ``{"init": <host pid of init>}`` and
  then, from init, ``{"ready": true}`` (with the Runtime
  API's listening socket, made inside the network namespace) or ``{"error": "..."}``;
- ``{"spawn": id, "argv", "env", "cwd", "fds": [targets], "ahead": bool}`` with one descriptor per target (``ahead``:
  another spawn follows in this Init, so fork its process ahead, as init does for the Init's first): answered
  first ``{"started": id}`` from the new process itself (lambdabox's socket passes credentials, so it learns the
  host pid), then ``{"spawned": id, "pid": <pid inside>}``, or ``{"spawned": id, "error": "..."}``;
- ``{"socket": [family, type, proto]}``: answered ``{"socket": true}`` with a new socket of the network namespace;
- ``{"show": [source, target]}``: a directory shown read-only at /var/lang or /var/runtime, answered ``{"shown": true}``
  or ``{"error": "..."}``; ``{"kill": signal}``: to every other process of the PID namespace, answered ``{"killed"}``;
- init sends ``{"exited": <pid inside>, "status": <wait status>}`` for each process it started, when it ends.
When the control socket closes (lambdabox is done, or gone), init exits and the kernel kills every process left in
the PID namespace. The holder also dies with its parent (PR_SET_PDEATHSIG), and init with the holder.
"""

from __future__ import annotations

import _socket as socket  # (the C modules: the holder imports no enum, typing or re, to start in a few ms)
import errno
import fcntl
import marshal
import os
import resource
import select
import struct
import sys

from lambdabox.sandbox import rootfs, seccomp, syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
MAX_MESSAGE = 1 << 20
MAX_FDS = 16
NOFILE = 1024  # Lambda's limit on a process's open files (Lambda quotas page)


def send(control: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """One message, with ``fds`` passed alongside."""
    data = marshal.dumps(message)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    control.sendmsg([data], ancillary)


def receive(control: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its descriptors (close-on-exec); None at end of file. Where the receiving socket passes
    credentials (SO_PASSCRED), the message gets ``"sender"``: the sending process's pid, as the receiver sees it."""
    space = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(_UCRED.size)
    data, ancillary, _flags, _address = control.recvmsg(MAX_MESSAGE, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    sender: int | None = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            count = len(payload) // 4
            fds.extend(struct.unpack(f"{count}i", payload[: count * 4]))
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            sender = _UCRED.unpack(payload[: _UCRED.size])[0]
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message: dict[str, Any] = marshal.loads(data)
    if sender is not None:
        message["sender"] = sender
    return message, fds


def main() -> None:
    control, sockets = (socket.socket(fileno=int(fd)) for fd in sys.argv[1:3])
    for channel in (control, sockets):
        os.set_inheritable(channel.fileno(), False)
    config, fds = receive(control)
    if config is None:
        return
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != config["parent"]:  # lambdabox is already gone
        return
    try:
        flags = syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID | syscalls.CLONE_NEWIPC
        syscalls.unshare(flags | syscalls.CLONE_NEWUTS | (syscalls.CLONE_NEWNET if config["net"] else 0))
    except OSError as error:
        send(control, {"error": f"cannot make the namespaces: {error}"})
        return
    send(control, {"unshared": True})  # lambdabox maps Lambda's user to one of its choosing outside
    mapped, _ = receive(control)
    if mapped is None or "mapped" not in mapped:
        return
    try:  # still the user outside (its owner rights reach what it may): the filesystem's sources, in the new
        fds += [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in config["sources"]]  # mount namespace
    except OSError as error:
        send(control, {"error": f"cannot open {error.filename}: {error.strerror}"})
        return
    os.setresgid(config["gid"], config["gid"], config["gid"])  # become the mapped user (capabilities stay: the
    os.setresuid(config["uid"], config["uid"], config["uid"])  # namespace's root, 0, is not who it was)
    pid = os.fork()
    if pid == 0:
        _init(control, sockets, config, fds)  # never returns
    send(control, {"init": pid})
    control.close()
    sockets.close()
    for fd in fds:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(control: socket.socket, sockets: socket.socket, config: dict[str, Any], fds: list[int]) -> None:
    """PID 1 of the namespace: the filesystem, the listener, then serve until the control socket closes. ``fds``:
    the cgroups' ``cgroup.procs`` (``config["cgroups"]`` of them), then the filesystem's sources."""
    cgroup_fds, sources = fds[: config["cgroups"]], fds[config["cgroups"] :]
    try:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        if config["net"]:
            syscalls.loopback_up()
        rootfs.build(config["fs"], sources)
        for fd in sources:
            os.close(fd)
        listeners = []
        if (api := config.get("api")) is not None:  # the Runtime API's, handed to lambdabox
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((api[0], api[1]))
            listener.listen(128)
            listeners.append(listener.fileno())
        send(control, {"ready": True}, listeners)
        for fd in listeners:
            os.close(fd)
    except Exception as error:
        send(control, {"error": f"cannot build the environment: {error}"})
        os._exit(1)
    try:
        _Init(control, sockets, config, cgroup_fds).serve()
    finally:
        os._exit(0)


class _Init:
    def __init__(
        self, control: socket.socket, sockets: socket.socket, config: dict[str, Any], cgroup_fds: list[int]
    ) -> None:
        self.control = control
        self.sockets = sockets
        self.cgroup_fds = cgroup_fds
        self.filter: bytes = config.get("seccomp") or b""
        self.started: set[int] = set()
        self.wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.ahead: tuple[int, socket.socket] | None = self._fork_ahead()  # for the Init's first spawn

    def serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.control.fileno(), self.sockets.fileno(), self.wake_r], [], [])
            if self.wake_r in ready:
                while True:
                    try:
                        os.read(self.wake_r, 512)
                    except BlockingIOError:
                        break
            self._reap()
            for channel in (self.control, self.sockets):
                if channel.fileno() in ready:
                    message, fds = receive(channel)
                    if message is None:
                        return
                    try:
                        self._handle(channel, message, fds)
                    finally:
                        for fd in fds:
                            os.close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.started:
                self.started.discard(pid)
                send(self.control, {"exited": pid, "status": status})

    def _handle(self, channel: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        if "socket" in message:
            family, kind, proto = message["socket"]
            made = socket.socket(family, kind, proto)
            try:
                send(channel, {"socket": True}, [made.fileno()])
            finally:
                made.close()
        elif "show" in message:
            source, target = message["show"]
            try:
                rootfs.show(source, target)
                send(channel, {"shown": True})
            except OSError as error:
                send(channel, {"error": f"cannot show {source} at {target}: {error.strerror or error}"})
        elif "kill" in message:
            try:  # noqa: SIM105 (contextlib is not imported here)
                os.kill(-1, message["kill"])  # from init: every other process of the PID namespace
            except ProcessLookupError:
                pass
            self._drop_ahead()  # (it got the signal too; the next Init's first spawn forks one)
            send(channel, {"killed": True})
        elif "spawn" in message:
            ident = message["spawn"]
            try:
                pid = self._spawn(message, fds)
            except OSError as error:
                send(self.control, {"spawned": ident, "error": f"{error.strerror or error}: {message['argv'][0]}"})
                return
            self.started.add(pid)
            send(self.control, {"spawned": ident, "pid": pid})

    def _spawn(self, message: dict[str, Any], fds: list[int]) -> int:
        """Hand the spawn to the process forked ahead (or, none being there, forked now), which execs; with
        ``"ahead"`` in the message, fork the next spawn's process ahead. An OSError the process met before exec is
        raised here (it is reaped later)."""
        for _ in range(2):  # a second try only if the one ahead was gone before it got the message
            (pid, channel), self.ahead = self.ahead or self._fork_ahead(), None
            try:
                try:
                    send(channel, message, fds)
                    sent = True
                except OSError:
                    sent = False
                said = channel.recv(64)  # an errno, or nothing at end of file: its exec closed the socket
            finally:
                channel.close()
            if not said and not sent:  # gone without a word: killed while it waited
                continue
            if message.get("ahead"):
                self.ahead = self._fork_ahead()
            if said:
                code = int(said)
                raise OSError(code, os.strerror(code))
            return pid
        raise OSError(errno.ECHILD, "the process forked to start it was gone")

    def _fork_ahead(self) -> tuple[int, socket.socket]:
        """Fork the process that the next spawn execs, and let it join the cgroups now: a move into a cgroup waits
        for the kernel's cgroup lock, which can take an RCU grace period (5 to 25 ms here, on an idle machine), and
        that wait is then off the process's start (its Init Duration). It waits for its spawn message, or for the
        end of file (init gone, or :meth:`_drop_ahead`), and exits then."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0)  # both close on exec
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in self.cgroup_fds:
                    os.write(fd, b"0")  # 0: the writing process
                message, fds = receive(theirs)
                if message is not None:
                    self._child(message, fds)
            except OSError as error:
                theirs.send(f"{error.errno}".encode())
            except BaseException:
                theirs.send(f"{errno.EINVAL}".encode())
            os._exit(127)
        theirs.close()
        return pid, ours

    def _drop_ahead(self) -> None:
        if self.ahead is not None:
            self.ahead[1].close()  # (it sees the end of file and exits; reaped as any child)
            self.ahead = None

    def _child(self, message: dict[str, Any], fds: list[int]) -> None:
        """In the process forked ahead, in the cgroups already: its own session, its descriptors, Lambda's limits,
        then exec."""
        # Its pid as lambdabox sees it: the kernel puts the sender's into a message to a socket that passes
        # credentials, translated into the receiver's PID namespace (before init's answer, and before any exit).
        send(self.control, {"started": message["spawn"]})
        os.setsid()
        high = [_dup_high(fd) for fd in fds]  # out of the way of every target
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
        for fd, target in zip(high, message["fds"], strict=True):
            os.dup2(fd, target)
        for fd in high:
            os.close(fd)
        os.chdir(message["cwd"])
        os.umask(0o022)
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        syscalls.drop_bounding_set()
        if self.filter:
            seccomp.install(self.filter)
        else:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        env = message["env"]
        os.execvpe(message["argv"][0], message["argv"], env)


def _dup_high(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
