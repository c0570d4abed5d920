"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest

from support import Recorder


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
