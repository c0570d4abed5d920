"""Owns the start and the end of lambdabox's own helper processes (an environment's holder, its slirp4netns):
started with ``posix_spawn`` (no copy of lambdabox's page tables: about 0.2 ms here, where uvloop's
``create_subprocess_exec`` forks lambdabox's whole process first, about 2 ms, holding the event loop meanwhile), and
reaped through a pidfd the event loop watches, so that ``returncode`` is set as the process ends, as an
``asyncio.subprocess.Process``'s is. The environment's own processes are started by the holder, not here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence


class Helper:
    """A process :func:`spawn_helper` started: its pid, its exit status once it ended (``-N``: killed by signal N)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # a kernel before 5.3: a thread of the loop's executor waits instead
            loop.run_in_executor(None, os.waitpid, pid, 0).add_done_callback(self._waited)
        else:
            loop.add_reader(self._pidfd, self._reap)

    async def wait(self) -> int:
        """Its exit status, once it has ended (bound it with the caller's deadline)."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """Signal it, unless it was reaped (its pid may be another's by then)."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        """The pidfd is readable: the process has ended."""
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0  # (reaped by someone else: nothing more to know)
        self._ended(status)

    def _waited(self, waited: asyncio.Future[tuple[int, int]]) -> None:
        self._ended(0 if waited.exception() is not None else waited.result()[1])

    def _ended(self, status: int) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self._exited.done():
            self._exited.set_result(self.returncode)


def spawn_helper(
    argv: Sequence[str],
    *,
    output: int,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> Helper:
    """Start ``argv`` (found on PATH) in a session of its own (Ctrl-C in a terminal is lambdabox's to handle), its
    stdin /dev/null, its stdout and stderr on ``output``, with ``pass_fds`` open in it at the same numbers; OSError if
    it cannot be started. Call it from the event loop."""
    kept = [fd for fd in pass_fds if not os.get_inheritable(fd)]
    for fd in kept:
        os.set_inheritable(fd, True)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, output, 1),
            (os.POSIX_SPAWN_DUP2, output, 2),
        ]
        pid = os.posix_spawnp(
            argv[0], list(argv), dict(os.environ if env is None else env), file_actions=actions, setsid=True
        )
    finally:
        for fd in kept:
            os.set_inheritable(fd, False)
    return Helper(pid)
