"""Helpers the benchmark scripts share: percentiles, units, and an observer that explains a failed invoke."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
from typing import Any

import uvloop

from lambdabox.environment.report import TelemetryEvent


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return seconds * 1000.0


class LogTail:
    """Observer keeping the last lines the runtime and extensions wrote, to explain a failed invoke."""

    def __init__(self, keep: int = 30) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def __call__(self, event: TelemetryEvent) -> None:
        if event.type in ("function", "extension"):
            self.lines.append(f"{event.source}: {event.record}")

    def failure(self, outcome: object) -> RuntimeError:
        return RuntimeError(f"unexpected outcome: {outcome!r}; last output:\n" + "\n".join(self.lines))


LOOPS = ("uvloop", "asyncio")


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on lambdabox's loop (uvloop) or on asyncio's own, as ``--loop`` says (to compare the two)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop) as runner:
        runner.run(main)
