"""The environment's network (``outbound.network``): slirp4netns's usual 10.0.2.0/24 unless the host's own networks
overlap it, as a VirtualBox or QEMU guest's 10.0.2.15 does; and the host's address on its outbound route."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import NamedTuple

import psutil
import pytest

from lambdabox.sandbox import outbound


class Address(NamedTuple):
    """What ``outbound.network`` reads of one of ``psutil.net_if_addrs()``'s addresses."""

    family: int
    address: str
    netmask: str | None


def interface(address: str, netmask: str, family: int = socket.AF_INET) -> Address:
    return Address(family, address, netmask)


@pytest.fixture
def host_networks(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[Address]]]:
    """The host's interfaces as ``outbound.network`` sees them (a test fills them in)."""
    found: dict[str, list[Address]] = {"lo": [interface("127.0.0.1", "255.0.0.0")]}
    monkeypatch.setattr(outbound.psutil, "net_if_addrs", lambda: found)
    outbound.network.cache_clear()
    yield found
    outbound.network.cache_clear()


def test_the_usual_network_where_the_host_has_none_that_overlaps(
    host_networks: dict[str, list[Address]],
) -> None:
    host_networks["eth0"] = [interface("172.17.0.5", "255.255.0.0"), interface("fe80::1", "ffff::", socket.AF_INET6)]
    assert outbound.network() == ipaddress.IPv4Network("10.0.2.0/24")
    assert outbound.dns_address() == "10.0.2.3"


def test_another_network_where_the_host_is_on_the_usual_one(
    host_networks: dict[str, list[Address]],
) -> None:
    host_networks["eth0"] = [interface("10.0.2.15", "255.255.255.0")]  # QEMU's or VirtualBox's user network
    host_networks["tun0"] = [interface("10.0.0.1", "255.255.252.0")]  # 10.0.0.0/22 takes 10.0.3.0/24 too
    assert outbound.network() == ipaddress.IPv4Network("10.201.0.0/24")
    assert outbound.dns_address() == "10.201.0.3"


def test_the_host_address_is_one_of_the_hosts_own_and_not_its_loopback() -> None:
    address = outbound.host_address()
    if address is None:
        pytest.skip("no route off this host")
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    assert address in own
    assert not ipaddress.IPv4Address(address).is_loopback
    assert not outbound.network().overlaps(ipaddress.IPv4Network(f"{address}/32"))
