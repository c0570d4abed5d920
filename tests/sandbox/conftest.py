"""Fixtures shared by the sandbox tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runtime cache for the session: the first use of each Python version installs from PyPI."""
    return tmp_path_factory.mktemp("runtime-cache")
