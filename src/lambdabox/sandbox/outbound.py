"""Owns an environment's outbound network: slirp4netns, a user-mode network stack that gives the environment's
network namespace an interface (tap0, ``.100`` of its network, default route through ``.2``) whose connections
leave through ordinary sockets of the host, as a function in Lambda reaches the internet, and ``.3`` answers DNS
with the host's resolver. The network is slirp4netns's usual 10.0.2.0/24 unless one of the host's own networks
overlaps it (a VirtualBox or QEMU guest is 10.0.2.15): then the first of :data:`NETWORKS` that overlaps none.
The host's loopback is out of reach (``--disable-host-loopback``): lambdabox's own Invoke API and whatever else
listens only there stay the host's. ``host.lambdabox.internal`` names the host's own address on its outbound route
instead, as ``host.docker.internal`` (host-gateway) does for a container on Linux: a service the user means an
environment to reach listens there or on 0.0.0.0."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import shutil
import socket
from pathlib import Path

import psutil

from lambdabox.sandbox.helper import Helper, spawn_helper

DEADLINE_S = 5.0
"""Bound on every wait: the interface configured, slirp4netns gone."""
NETWORKS = ("10.0.2.0/24", "10.0.3.0/24", "10.201.0.0/24", "172.30.201.0/24", "192.168.201.0/24")
"""The environment's network: the first of these that overlaps none of the host's (the last one if all do)."""
HOST_NAMES = ("host.lambdabox.internal", "host.docker.internal")
"""Names of the machine lambdabox runs on, as seen from an environment (the second one as ``sam local`` users
know it from Docker)."""


@functools.cache
def host_address() -> str | None:
    """The host's IPv4 address that its connections to the internet leave from (no packet is sent: a UDP socket's
    connect only chooses the route), or None where it has no route but its loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe_socket:
        try:
            probe_socket.connect(("198.51.100.1", 9))  # TEST-NET-2 (RFC 5737): any address off the host would do
        except OSError:
            return None
        address: str = probe_socket.getsockname()[0]
    return None if address.startswith("127.") else address


@functools.cache
def network() -> ipaddress.IPv4Network:
    """The environment's network (:data:`NETWORKS`), the same for every environment of this process."""
    host = [
        ipaddress.IPv4Interface(f"{address.address}/{address.netmask}").network
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family == socket.AF_INET and address.netmask
    ]
    candidates = [ipaddress.IPv4Network(cidr) for cidr in NETWORKS]
    return next((net for net in candidates if not any(net.overlaps(other) for other in host)), candidates[-1])


def dns_address() -> str:
    """Where the environment's DNS is answered (with the host's resolver): ``.3`` of its network."""
    return str(network()[3])


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
        self._process: Helper | None = None
        self._exit_w: int | None = None

    async def start(self, net_path: str, log: Path, user_path: str | None = None) -> str | None:
        """Give the network namespace at ``net_path`` (owned by the user namespace at ``user_path``) its outbound
        interface; None, or why it could not be had. slirp4netns writes what it has to say to ``log``."""
        ready_r, ready_w = os.pipe()
        exit_r, self._exit_w = os.pipe()
        argv = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback", f"--cidr={network()}"]
        argv += [f"--ready-fd={ready_w}", f"--exit-fd={exit_r}"]
        argv += [*([f"--userns-path={user_path}"] if user_path else []), "--netns-type=path", net_path, "tap0"]
        try:
            with log.open("ab") as out:
                self._process = spawn_helper(argv, output=out.fileno(), pass_fds=(ready_w, exit_r))
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
