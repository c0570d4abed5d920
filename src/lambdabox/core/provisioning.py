"""Provisioned concurrency as data: when an environment that leaves a pool is replaced, and after what delay (at once
after a loss, with a capped, doubling backoff while Init keeps failing). Pure: facts in, decisions out; no clock."""

from __future__ import annotations

from dataclasses import dataclass

from lambdabox.core.batching import Backoff

REPLACEMENT_BACKOFF = Backoff(first_s=1.0, cap_s=60.0)  # 1, 2, 4 ... 60 s after 1, 2, 3 ... consecutive failed Inits


@dataclass(frozen=True)
class Replace:
    """Start a provisioned environment at ``at`` (on the clock ``now`` was read from), ``delay_s`` after the fact."""

    at: float
    delay_s: float


class Provisioning:
    """Keeps a function's provisioned count, as Lambda does, by replacing every provisioned environment that leaves
    the pool for a reason other than the pool closing. One that had initialised is replaced at once; one whose start
    or Init failed counts as a failure, and replacements wait ``backoff.delay(failures)`` after consecutive failures
    (shared by the function's provisioned environments), so an Init that always fails never becomes a tight loop.
    A successful Init starts the count over."""

    def __init__(self, backoff: Backoff = REPLACEMENT_BACKOFF) -> None:
        self.backoff = backoff
        self.failures = 0  # consecutive failed starts or Inits, since the last successful Init
        self.closing = False

    def initialized(self) -> None:
        """A provisioned environment finished Init successfully."""
        self.failures = 0

    def left(self, now: float, *, provisioned: bool, initialized: bool) -> Replace | None:
        """An environment left the pool; ``initialized``: it had finished Init at least once (else its start failed).
        Returns when to start its replacement, or None when it is not replaced."""
        if not provisioned or self.closing:
            return None
        if not initialized:
            self.failures += 1
        delay = self.backoff.delay(self.failures) if self.failures else 0.0
        return Replace(now + delay, delay)

    def close(self) -> None:
        """The pool is closing: nothing is replaced from now on."""
        self.closing = True
