"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
