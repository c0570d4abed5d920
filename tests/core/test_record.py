"""The small pure pieces of the lifecycle's records: Lambda's wording for how a process ended, and the billed
duration."""

from __future__ import annotations

import pytest

from lambdabox.core.record import billed_ms, exit_description


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exit status 0"),
        (1, "exit status 1"),
        (-9, "signal: killed"),
        (-15, "signal: terminated"),
        (-7, "signal: 7"),
    ],
)
def test_exit_description(returncode: int, text: str) -> None:
    assert exit_description(returncode) == text


@pytest.mark.parametrize(("duration", "billed"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.001, 2), (250.5, 251)])
def test_billed_ms_rounds_up_to_whole_milliseconds(duration: float, billed: int) -> None:
    assert billed_ms(duration) == billed
