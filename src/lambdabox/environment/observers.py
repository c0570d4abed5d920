"""Who hears of one environment's events: the Logs and Telemetry API hub and the observers given to it, called in turn
with every event, and lambdabox's own lines (source "lambdabox"), which the observers get but no subscriber does. An
observer that raises is reported (on stderr, and as a lambdabox line to the others) the first time and counted after;
it never stops the others, a command, or an invoke."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

from lambdabox.environment.report import Observer, TelemetryEvent


class Clock:
    """Epoch seconds on a monotonic base: what an environment's facts and records are stamped with."""

    def __init__(self) -> None:
        self._mono0, self._epoch0 = time.monotonic(), time.time()

    def now(self) -> float:
        return self._epoch0 + (time.monotonic() - self._mono0)


class Observers:
    """The observers of one environment: ``telemetry`` (the hub's) first, then the others."""

    def __init__(
        self, observers: Iterable[Observer], now: Callable[[], float], telemetry: Observer | None = None
    ) -> None:
        self._all = [*([telemetry] if telemetry is not None else []), *observers]
        self._first = 0 if telemetry is None else 1  # where the observers that get lambdabox's lines begin
        self._now = now
        self.failures: dict[int, int] = {}  # an observer's index -> times it raised

    def __call__(self, event: TelemetryEvent) -> None:
        self._each(event, 0)

    def log(self, text: str) -> None:
        """A line of lambdabox's own in the environment's log."""
        self._each(TelemetryEvent(self._now(), "extension", text, "lambdabox"), self._first)

    def report_counts(self) -> None:
        """At the environment's end: how often each failing observer raised, on stderr."""
        for index, count in self.failures.items():
            if count > 1:
                _say(f"lambdabox: an observer of the environment ({self._all[index]!r}) failed {count} times")

    def _each(self, event: TelemetryEvent, first: int) -> None:
        failed: list[tuple[int, Exception]] = []
        for index in range(first, len(self._all)):
            try:
                self._all[index](event)
            except Exception as problem:
                failed.append((index, problem))
        for index, raised in failed:
            self._failed(index, raised)

    def _failed(self, index: int, error: Exception) -> None:
        count = self.failures[index] = self.failures.get(index, 0) + 1
        if count > 1:
            return
        text = (
            f"lambdabox: an observer of the environment ({self._all[index]!r}) failed: {error!r}; "
            "later failures are counted"
        )
        _say(text)
        line = TelemetryEvent(self._now(), "extension", text, "lambdabox")
        for other in range(self._first, len(self._all)):
            if other != index:
                try:
                    self._all[other](line)
                except Exception:
                    self.failures[other] = self.failures.get(other, 0) + 1


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
