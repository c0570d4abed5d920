"""Owns one thread that lives inside an environment's network namespace, and makes sockets there: a socket belongs
to the namespace of the thread that created it for its whole life, so the environment's API listener (127.0.0.1:9001)
and the connections to its extensions' telemetry listeners are made through :meth:`NetNamespace.socket`.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from lambdabox.sandbox import syscalls

DEADLINE_S = 5.0
"""Bound on every wait for the thread: entering the namespace, making a socket, exiting."""

_Job = tuple[Callable[[], Any], "Future[Any]"]


class NetNamespace:
    """A thread inside the network namespace at ``path`` (such as ``/proc/<pid>/ns/net``), entered once; sockets
    made by :meth:`socket` belong to that namespace. Hold it only as long as needed: the thread keeps the namespace
    alive (as does every socket made there) after its last process is gone. :meth:`close` ends the thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.inode = os.fstat(fd).st_ino  # identifies the namespace (as in /proc/<pid>/ns/net -> net:[inode])
        entered: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, args=(fd, entered), name=f"netns:{self.inode}", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(fd)
            raise
        try:
            entered.result(DEADLINE_S)
        except BaseException:
            self.close()
            raise

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A new socket in the namespace (the caller waits for one hop to the namespace's thread and back)."""
        return self.call(socket.socket, family, type, proto)  # type: ignore[no-any-return]

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on the namespace's thread (where name lookups and new sockets happen inside)."""
        if self._closed:
            raise OSError(f"network namespace {self.path} is closed")
        done: Future[Any] = Future()
        self._jobs.put((lambda: function(*args), done))
        return done.result(DEADLINE_S)

    def close(self) -> None:
        """End the thread (idempotent). Sockets made here stay usable until closed themselves."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self._thread.ident is not None:
            self._thread.join(DEADLINE_S)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _serve(self, fd: int, entered: Future[None]) -> None:
        try:
            syscalls.setns(fd, syscalls.CLONE_NEWNET)
            if os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino != self.inode:
                raise OSError(f"setns did not enter {self.path}")
        except BaseException as error:
            entered.set_exception(error)
            return
        finally:
            os.close(fd)
        entered.set_result(None)
        while (job := self._jobs.get()) is not None:
            function, done = job
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function())
                except BaseException as error:
                    done.set_exception(error)
