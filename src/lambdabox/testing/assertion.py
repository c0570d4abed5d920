"""Assertions about invokes and events whose failure messages show what was seen: the outcome, the REPORT,
the events in order, the last log lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lambdabox.core.model import FunctionFailure, Response
from lambdabox.environment.report import TelemetryEvent
from lambdabox.testing.events import ExtensionEvent, Invocation, last_lines

LISTED = 60  # labels shown in an order failure


def assert_invoked_ok(invocation: Invocation) -> Any:
    """The invoke returned a response; returns it decoded. Else fails with the error and the last log lines."""
    __tracebackhide__ = True
    if not invocation.ok:
        raise AssertionError(f"invoke {invocation.request_id} failed\n{_story(invocation)}")
    return invocation.response


def assert_invoke_failed(invocation: Invocation, error_type: str | None = None) -> Invocation:
    """The invoke ended with a function error or a Lambda error (of this errorType, if given)."""
    __tracebackhide__ = True
    if invocation.ok or (error_type is not None and invocation.error_type != error_type):
        wanted = f"error {error_type}" if error_type else "an error"
        raise AssertionError(f"invoke {invocation.request_id}: expected {wanted}\n{_story(invocation)}")
    return invocation


def assert_event_order(
    events: Sequence[TelemetryEvent | ExtensionEvent | str], expected: Sequence[str], *, exact: bool = False
) -> None:
    """``expected`` event types (or extension states, or strings) are seen in this order; other events may come
    between them, unless ``exact``."""
    __tracebackhide__ = True
    seen = [_label(item) for item in events]
    if exact:
        if seen != list(expected):
            first = next((i for i, (a, b) in enumerate(zip(seen, expected, strict=False)) if a != b), None)
            raise AssertionError(f"expected exactly {list(expected)}\n{_listing(seen, first)}")
        return
    position = 0
    for index, wanted in enumerate(expected):
        try:
            position = seen.index(wanted, position) + 1
        except ValueError:
            after = f" after {expected[index - 1]!r} (#{position})" if index else ""
            raise AssertionError(
                f"expected {list(expected)} in this order: {wanted!r} not seen{after}\n{_listing(seen, position)}"
            ) from None


def _label(item: TelemetryEvent | ExtensionEvent | str) -> str:
    if isinstance(item, str):
        return item
    return item.state if isinstance(item, ExtensionEvent) else item.type


def _listing(seen: list[str], mark: int | None) -> str:
    """Every label seen, numbered; ``>`` marks where the search went on from (or the first difference)."""
    low = max(0, min((mark or 0) - LISTED // 2, len(seen) - LISTED))
    rows = [f"  {'>' if i == mark else ' '} #{i + 1} {seen[i]}" for i in range(low, min(len(seen), low + LISTED))]
    more = [f"  ({low} before, {len(seen) - low - len(rows)} after not shown)"] if len(rows) < len(seen) else []
    return "\n".join([f"seen ({len(seen)}):", *rows, *more])


def _story(invocation: Invocation) -> str:
    outcome = invocation.outcome
    if isinstance(outcome, Response):
        said = f"response: {invocation.response!r}"[:1000]
    else:
        kind = "function error" if isinstance(outcome, FunctionFailure) else "Lambda error"
        said = f"{kind} {outcome.error_type}: {invocation.error_message}"
    report = invocation.report
    summary = f"REPORT status {report.status}, duration {report.duration_ms} ms, {report.max_memory_used_mb} MB used"
    return "\n".join([said, summary, last_lines(invocation.events)])
