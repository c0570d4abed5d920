"""Fixtures shared by every test module."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from lambdabox.sandbox import leftovers
from lambdabox.sandbox.cgroups import CGROUP_ROOT, V2_PARENT
from support import Recorder


@pytest.fixture(autouse=True, scope="session")
def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every lambdabox the tests start keeps its logs under the tests' temporary directory, not the repository's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAMBDABOX_LOG_DIR", str(tmp_path_factory.mktemp("logs")))
        yield


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


# Property-based suites (tests/fuzz_support.py): the same examples in every run, none kept on disk; a longer, random
# run with --hypothesis-profile=long.
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
settings.register_profile("long", max_examples=5_000, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
settings.load_profile("ci")


def _lambdabox_cgroups_of(owners: Callable[[str], bool]) -> list[str]:
    """The live lambdabox cgroups on this host whose owner (``<pid>.<start>``) ``owners`` accepts."""
    found = []
    for parent in (CGROUP_ROOT / "memory", CGROUP_ROOT / "freezer", CGROUP_ROOT / V2_PARENT):
        with contextlib.suppress(OSError):
            found += [str(parent / n) for n in os.listdir(parent) if (m := _OWNED.match(n)) and owners(m.group(1))]
    return sorted(found)


_OWNED = re.compile(r"lambdabox-(\d+\.\d+)-")


@pytest.fixture(autouse=True, scope="session")
def _no_cgroup_left_behind() -> Iterator[None]:
    """After the whole suite: no cgroup of an environment this test process opened is left, and none of a lambdabox
    that is gone (the start-lambda processes the tests start and kill) that was not there before."""
    mine = leftovers.owner()

    def gone(owner: str) -> bool:
        pid, started = owner.split(".")
        return leftovers.start_time(int(pid)) != int(started)

    before = set(_lambdabox_cgroups_of(gone))
    yield
    left = [path for path in _lambdabox_cgroups_of(lambda o: o == mine or gone(o)) if path not in before]
    assert left == [], f"cgroups left behind by the suite: {left}"
