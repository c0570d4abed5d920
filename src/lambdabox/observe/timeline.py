"""Where the time went: an observer that assembles the lifecycle's ``lambdabox.*`` marks and Lambda's platform events
into spans, one section per Init, invoke and shutdown and one row per process (lambdabox, the runtime, each
extension), and draws them as a few compact lines for the console (the page is :mod:`lambdabox.observe.page`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lambdabox.core import facts as mark
from lambdabox.core.telemetry import EventLike

PLATFORM = "lambdabox"
RUNTIME = "runtime"
RUNTIME_INIT = "runtime + function init"  # Lambda cannot tell the two apart for a managed runtime: both end at /next
AFTER = "after response"
MOMENTS = frozenset({"signal", "kill", "exit"})
GLYPHS = {"function": "#", "work": "=", "response": ">", "after": "!", "error": "X", "shutdown": "~", "start": "-"}
LEGEND = {
    "platform": "phase as lambdabox sees it",
    "start": "extension start to its registration",
    "init": "init, to the first /next",
    "function": "function code (to the response's first byte)",
    "response": "response sent",
    "work": "extension handling INVOKE",
    "after": "after the response: still holding the invoke open",
    "error": "error, timeout or crash",
    "shutdown": "shutdown (SIGTERM or SHUTDOWN, to exit)",
    "signal": "SIGTERM",
    "kill": "SIGKILL",
    "exit": "process exit",
}
LONG_AFTER_MS = 50.0  # work after the response is called out from 50 ms, if it is also a fifth of the invoke or more


@dataclass(frozen=True)
class Span:
    """One bar on one process's row; a moment (a signal, an exit) when its kind is in ``MOMENTS``."""

    row: str
    label: str
    kind: str
    start: float  # epoch seconds
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


@dataclass
class Section:
    """One phase of one environment: ``init``, ``invoke`` (with its request id) or ``shutdown``."""

    phase: str
    start: float
    detail: str
    request_id: str | None = None
    number: int = 0  # of the invoke, counting from 1
    end: float | None = None
    status: str = "success"
    spans: list[Span] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)  # platform.report's metrics, for an invoke
    environment: str = ""  # which environment, where a page shows several

    @property
    def ms(self) -> float:
        return ((self.end or self.start) - self.start) * 1000.0

    def rows(self) -> list[str]:
        """lambdabox, the runtime, then the extensions in the order they first appear."""
        seen = dict.fromkeys(s.row for s in self.spans)
        return [r for r in (PLATFORM, RUNTIME) if r in seen] + [r for r in seen if r not in (PLATFORM, RUNTIME)]

    def ms_of(self, row: str) -> float:
        """From the row's first bar's start to its last bar's end."""
        bars = [s for s in self.spans if s.row == row and s.kind not in MOMENTS]
        return (max(s.end for s in bars) - min(s.start for s in bars)) * 1000.0 if bars else 0.0

    def held_open(self) -> list[tuple[str, float]]:
        """(extension, ms) for each extension whose work after the response stands out."""
        extensions = [r for r in self.rows() if r not in (PLATFORM, RUNTIME)]
        after = {r: sum(s.ms for s in self.spans if s.row == r and s.kind == "after") for r in extensions}
        return [(r, ms) for r, ms in after.items() if ms >= max(LONG_AFTER_MS, 0.2 * self.ms)]


def _row(record: dict[str, Any]) -> str:
    return RUNTIME if record.get("process") == "runtime" else str(record.get("name"))


def _status(record: dict[str, Any]) -> str:
    """``success``, or the status with Lambda's error type: ``timeout: Sandbox.Timedout``."""
    status, error_type = str(record.get("status", "success")), record.get("errorType")
    return f"{status}: {error_type}" if error_type else status


class Timeline:
    """An observer (``Environment`` observers list); ``sections`` fill up as the environment runs."""

    def __init__(self, environment: str = "") -> None:
        self.environment = environment  # names this environment's sections, where a page shows several
        self.sections: list[Section] = []
        self._current: Section | None = None
        self._open: dict[str, tuple[float, str, str]] = {}  # row -> (start, label, kind) of a span still running
        self._response_at: float | None = None

    def __call__(self, event: EventLike) -> None:
        handler = _HANDLERS.get(event.type)
        if handler is not None and isinstance(event.record, dict):
            handler(self, event.time, event.record)

    def invoke(self, request_id: str) -> Section | None:
        return next((s for s in reversed(self.sections) if s.request_id == request_id and s.end), None)

    # ---- assembling ----------------------------------------------------------------------------------------------

    def _begin(self, section: Section) -> None:
        if self._current is not None:
            self._end(section.start)
        section.environment = self.environment
        self.sections.append(section)
        self._current = section
        self._response_at = None

    def _end(self, at: float, status: str | None = None) -> None:
        for row in list(self._open):
            self._close(row, at)
        if self._current is not None:
            self._current.end = at
            self._current.status = status or self._current.status
        self._current = None

    def _add(self, row: str, label: str, kind: str, start: float, end: float) -> None:
        if self._current is not None and (end > start or kind in MOMENTS):
            self._current.spans.append(Span(row, label, kind, start, end))

    def _start_span(self, row: str, at: float, label: str, kind: str) -> None:
        if self._current is not None:
            self._open[row] = (at, label, kind)

    def _close(self, row: str, at: float, label: str | None = None, kind: str | None = None) -> None:
        opened = self._open.pop(row, None)
        if opened is None:
            return
        start, opened_label, opened_kind = opened
        response = self._response_at
        if opened_kind == "work" and response is not None and start < response < at:  # split at the response
            self._add(row, opened_label, opened_kind, start, response)
            self._add(row, AFTER, "after", response, at)
        elif opened_kind == "work" and response is not None and at > start >= response:
            self._add(row, AFTER, "after", start, at)
        else:
            self._add(row, label or opened_label, kind or opened_kind, start, at)

    def _on_init_start(self, at: float, record: dict[str, Any]) -> None:
        self._begin(Section("init", at, str(record.get("initializationType", "on-demand"))))

    def _on_process_start(self, at: float, record: dict[str, Any]) -> None:
        row = _row(record)
        self._start_span(row, at, *((RUNTIME_INIT, "init") if row == RUNTIME else ("start + register", "start")))

    def _on_registered(self, at: float, record: dict[str, Any]) -> None:
        self._close(record["name"], at)
        self._start_span(record["name"], at, "init", "init")

    def _on_next(self, at: float, record: dict[str, Any]) -> None:
        if record.get("phase") in ("init", "invoke"):
            self._close(_row(record), at)

    def _on_init_report(self, at: float, record: dict[str, Any]) -> None:
        if self._current is not None:
            status = _status(record)
            self._add(PLATFORM, "init", "platform" if status == "success" else "error", self._current.start, at)
            self._end(at, status)

    def _on_start(self, at: float, record: dict[str, Any]) -> None:
        number = 1 + sum(s.phase == "invoke" for s in self.sections)
        self._begin(Section("invoke", at, str(record.get("version", "")), str(record.get("requestId")), number))
        self._start_span(RUNTIME, at, "function", "function")

    def _on_delivered(self, at: float, record: dict[str, Any]) -> None:
        shutdown = record.get("eventType") == "SHUTDOWN"
        self._start_span(_row(record), at, *(("SHUTDOWN to exit", "shutdown") if shutdown else ("invoke", "work")))

    def _on_response(self, at: float, record: dict[str, Any]) -> None:
        if record.get("status") == "success":
            first = float(record.get("firstByteAt") or at)
            self._close(RUNTIME, first)
            self._add(RUNTIME, "response", "response", first, at)
        else:
            self._close(RUNTIME, at, f"function ({_status(record)})", "error")
        self._response_at = at
        self._start_span(RUNTIME, at, AFTER, "after")

    def _on_invoke_end(self, at: float, record: dict[str, Any]) -> None:
        if self._current is None:
            return
        status = _status(record)
        if RUNTIME in self._open and self._open[RUNTIME][2] == "function":  # no response: timeout, crash, shutdown
            self._close(RUNTIME, at, f"function ({status})", "error")
        self._add(PLATFORM, "invoke", "platform" if status == "success" else "error", self._current.start, at)
        self._end(at, status)

    def _on_report(self, at: float, record: dict[str, Any]) -> None:
        section = self.invoke(str(record.get("requestId")))
        if section is not None:
            section.report = dict(record.get("metrics") or {})

    def _on_shutdown_start(self, at: float, record: dict[str, Any]) -> None:
        detail = str(record.get("reason", "")) + (", then a new Init" if record.get("reset") else "")
        self._begin(Section("shutdown", at, detail))

    def _on_signal(self, at: float, record: dict[str, Any]) -> None:
        row, signal = _row(record), str(record.get("signal"))
        if signal == "SIGTERM":
            self._start_span(row, at, "SIGTERM to exit", "shutdown")
            self._add(row, signal, "signal", at, at)
        else:
            self._close(row, at)
            self._add(row, signal, "kill", at, at)

    def _on_exit(self, at: float, record: dict[str, Any]) -> None:
        row = _row(record)
        self._close(row, at)
        self._add(row, str(record.get("description", "exited")), "exit", at, at)

    def _on_shutdown_end(self, at: float, record: dict[str, Any]) -> None:
        if self._current is not None:
            self._add(PLATFORM, "shutdown", "platform", self._current.start, at)
            self._end(at)

    # ---- the console's compact view ---------------------------------------------------------------------------

    def compact(self, request_id: str, *, width: int = 40, color: bool = False) -> str | None:
        """A few lines for the console after this invoke's REPORT: one bar per process, scaled to the invoke."""
        section = self.invoke(request_id)
        if section is None:
            return None
        index = self.sections.index(section)
        scale = f"one mark = {ms_text(section.ms / width)} ms"
        lines = [f"TIMELINE RequestId: {request_id}\tDuration: {section.ms:.2f} ms\t({scale})"]  # as in REPORT
        before = self.sections[index - 1] if index else None
        if before is not None and before.phase == "init" and before.end == section.start:
            rows = [(RUNTIME_INIT if r == RUNTIME else r, r) for r in before.rows() if r != PLATFORM]
            parts = ", ".join(f"{label} {ms_text(before.ms_of(r))} ms" for label, r in rows)
            lines.append(f"  init {ms_text(before.ms)} ms before it: {parts}")
        names = [r for r in section.rows() if r != PLATFORM]
        pad = max((len(n) for n in names), default=0)
        held = {name for name, _ in section.held_open()}
        for row in names:
            bar = _ascii_bar(section, row, width, color)
            line = f"  {row:<{pad}} |{bar}| {figures(section, row)}"
            if row in held:
                line += "  <- holds the invoke open"
            lines.append(line)
        return "\n".join(lines)


_HANDLERS = {
    "platform.initStart": Timeline._on_init_start,
    "platform.extension": Timeline._on_registered,
    "platform.initReport": Timeline._on_init_report,
    "platform.start": Timeline._on_start,
    "platform.report": Timeline._on_report,
    mark.PROCESS_START: Timeline._on_process_start,
    mark.NEXT: Timeline._on_next,
    mark.EVENT_DELIVERED: Timeline._on_delivered,
    mark.RESPONSE: Timeline._on_response,
    mark.INVOKE_END: Timeline._on_invoke_end,
    mark.SHUTDOWN_START: Timeline._on_shutdown_start,
    mark.SIGNAL: Timeline._on_signal,
    mark.PROCESS_EXIT: Timeline._on_exit,
    mark.SHUTDOWN_END: Timeline._on_shutdown_end,
}


def ms_text(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.1f}" if value < 10_000 else f"{value:.0f}"


def figures(section: Section, row: str) -> str:
    """``3.10 ms function, 0.05 ms response``: the row's time per phase, in the order the phases happened."""
    totals: dict[str, float] = {}
    for span in section.spans:
        if span.row == row and span.kind not in MOMENTS:
            totals[span.label] = totals.get(span.label, 0.0) + span.ms
    moments = [s.label for s in section.spans if s.row == row and s.kind in MOMENTS]
    return ", ".join([f"{ms_text(ms)} ms {label}" for label, ms in totals.items()] + moments)


def _ascii_bar(section: Section, row: str, width: int, color: bool) -> str:
    """One character per ``width``-th of the section: the phase that took most of that slice, blank for none."""
    step = max(section.ms, 1e-6) / 1000.0 / width
    spans = [s for s in section.spans if s.row == row and s.kind not in MOMENTS]
    cells = []
    for i in range(width):
        lo = section.start + i * step
        share: dict[str, float] = {}
        for span in spans:
            share[span.kind] = share.get(span.kind, 0.0) + max(0.0, min(span.end, lo + step) - max(span.start, lo))
        kind = max(share, key=lambda k: share[k], default="")
        glyph = GLYPHS.get(kind, "#") if kind and share[kind] > 0 else " "
        cells.append(f"\x1b[1;31m{glyph}\x1b[0m" if color and kind in ("after", "error") and glyph != " " else glyph)
    return "".join(cells)
