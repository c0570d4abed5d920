"""Owns an environment's outbound network: slirp4netns, a user-mode network stack that gives the environment's
network namespace an interface (tap0, 10.0.2.100/24, default route through 10.0.2.2) whose connections leave
through ordinary sockets of the host, as a function in Lambda reaches the internet. The host's own loopback is at
10.0.2.2 (``host.lambdabox.internal``), and 10.0.2.3 answers DNS with the host's resolver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

DEADLINE_S = 5.0
"""Bound on every wait: the interface configured, slirp4netns gone."""
HOST_ADDRESS = "10.0.2.2"
DNS_ADDRESS = "10.0.2.3"
HOST_NAMES = ("host.lambdabox.internal", "host.docker.internal")
"""Names of the machine lambdabox runs on, as seen from an environment (the second one as ``sam local`` users
know it from Docker)."""


def probe() -> str | None:
    """None if slirp4netns can be tried here, else why not."""
    if not shutil.which("slirp4netns"):
        return "slirp4netns not found"
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):  # 0666 on most distributions
        return f"/dev/net/tun cannot be opened by uid {os.geteuid()}, which slirp4netns needs"
    return None


class Outbound:
    """The slirp4netns process of one network namespace; it ends when :meth:`close` closes its exit pipe (or when
    lambdabox's process ends, which closes it too)."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._exit_w: int | None = None

    async def start(self, net_path: str, log: Path, user_path: str | None = None) -> str | None:
        """Give the network namespace at ``net_path`` (owned by the user namespace at ``user_path``) its outbound
        interface; None, or why it could not be had. slirp4netns writes what it has to say to ``log``."""
        ready_r, ready_w = os.pipe()
        exit_r, self._exit_w = os.pipe()
        argv = ["slirp4netns", "--configure", "--mtu=65520", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}"]
        try:
            with log.open("ab") as out:
                self._process = await asyncio.create_subprocess_exec(
                    *argv,
                    *([f"--userns-path={user_path}"] if user_path else []),
                    *["--netns-type=path", net_path, "tap0"],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=(ready_w, exit_r),
                    start_new_session=True,  # Ctrl-C in a terminal is lambdabox's to handle, not its
                )
        except OSError as e:
            os.close(ready_r)
            self.stop_soon()
            return f"slirp4netns did not start: {e}"
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            ready = await asyncio.wait_for(_read_once(ready_r), DEADLINE_S)
        except TimeoutError:
            ready = b""
        finally:
            os.close(ready_r)
        if ready == b"1":
            return None
        await self.close()
        said = log.read_text(errors="replace").strip().splitlines()  # noqa: ASYNC240 (a short local file)
        return f"slirp4netns failed: {said[-1] if said else 'no ready signal'}"

    def stop_soon(self) -> None:
        """Tell slirp4netns to end (idempotent): close its exit pipe. Its exit takes a while (the kernel removes
        its interface), which :meth:`close` waits for; whatever is done in between overlaps with it."""
        if self._exit_w is not None:
            os.close(self._exit_w)
            self._exit_w = None

    async def close(self) -> None:
        """End slirp4netns (idempotent), and kill it if it has not gone by the deadline."""
        self.stop_soon()
        process, self._process = self._process, None
        if process is None:
            return
        try:
            await asyncio.wait_for(process.wait(), DEADLINE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.wait_for(process.wait(), DEADLINE_S)


async def _read_once(fd: int) -> bytes:
    """One read from the pipe at ``fd`` once it is readable (b"" at EOF)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, 16)
