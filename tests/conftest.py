"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

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
