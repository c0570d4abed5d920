"""The invoke in progress: what is known of it so far (its response, status and times), and the commands and records
of each of its steps: handed out, answered (a response or an error), the runtime done, and its end."""

from __future__ import annotations

from typing import Any

from lambdabox.core import facts as f
from lambdabox.core import record
from lambdabox.core.errors import ApiError, ErrorType
from lambdabox.core.model import FunctionFailure, LambdaFailure, Response
from lambdabox.core.output import Output


class Invocation:
    """One invoke, from ``start`` to ``finish`` (or ``fail``); the lifecycle decides when each step happens."""

    def __init__(self, invoke: f.Invoke, started_at: float, init_duration_ms: float | None, out: Output) -> None:
        self.invoke = invoke
        self.started_at = started_at
        self.init_duration_ms = init_duration_ms  # of the Init this invoke waited for, for its REPORT
        self.responded = False
        self.response_at: float | None = None
        self.first_byte_at: float | None = None
        self.produced_bytes = 0
        self.status = "success"
        self.error_type: str | None = None
        self.runtime_done_at: float | None = None  # the runtime asked for its next event: it is done with this invoke
        self._out = out

    @property
    def request_id(self) -> str:
        return self.invoke.request_id

    def start(self, deadline: float, version: str) -> dict[str, Any]:
        """Arm the timeout, emit platform.start, hand the event to the runtime; the INVOKE event for extensions."""
        self._out.add(f.ArmTimer(f.Timer.INVOKE, deadline))
        tracing = record.tracing(self.invoke.trace_id)
        self._out.emit("platform.start", requestId=self.request_id, version=version, tracing=tracing)
        self._out.add(f.DeliverInvoke(self.invoke, deadline))
        return record.invoke_event(self.invoke, deadline)

    def respond(self, fact: f.ResponsePosted, now: float) -> None:
        self._answer(fact.request_id, now)
        self.first_byte_at = fact.first_byte_at
        self.produced_bytes = len(fact.body)
        self._out.add(f.Respond(fact.request_id, Response(fact.body, fact.content_type)))
        extra = {"firstByteAt": fact.first_byte_at}
        self._out.mark(f.RESPONSE, None, requestId=fact.request_id, status="success", **extra)

    def error(self, fact: f.ErrorPosted, now: float) -> None:
        self._answer(fact.request_id, now)
        self.status, self.error_type = "error", fact.error_type
        self._out.add(f.Respond(fact.request_id, FunctionFailure(fact.body, fact.error_type)))
        self._out.mark(f.RESPONSE, None, requestId=fact.request_id, status="error", errorType=fact.error_type)

    def runtime_next(self, now: float) -> None:
        """The runtime asked for its next event: it must have answered this one first."""
        if not self.responded:
            message = "the runtime asked for the next event before responding"
            raise ApiError(403, ErrorType.INVALID_STATE_TRANSITION, message)
        self.runtime_done_at = now
        self._out.mark(f.NEXT, None, phase="invoke", requestId=self.request_id)
        self._out.emit("platform.runtimeDone", **self._runtime_done(now))

    def finish(self, now: float, post_runtime_extensions_ms: float | None = None) -> None:
        """The invoke phase is over (Duration ends now): FinishInvoke, whose REPORT the shell writes."""
        self._out.mark_invoke_end(self.request_id, self.status, self.error_type)
        duration = record.ms(now - self.started_at)
        self._out.add(
            f.FinishInvoke(
                self.request_id,
                self.status,
                self.error_type,
                duration,
                self.init_duration_ms,
                post_runtime_extensions_ms,
            )
        )

    def fail(self, now: float, status: str, failure: LambdaFailure) -> None:
        """Lambda ends the invoke (a timeout, a crash, a shutdown): the caller gets ``failure`` unless the runtime
        answered already, and the invoke phase is over."""
        failure = LambdaFailure(failure.error_type, f"RequestId: {self.request_id} Error: {failure.message}")
        if status == "failure":  # the Logs API's record of a fault (Telemetry subscribers do not get it)
            self._out.emit_text("platform.fault", f"{failure.message}\n{failure.error_type}")
        if not self.responded:
            self.responded = True
            self._out.add(f.Respond(self.request_id, failure))
        self.status, self.error_type = status, failure.error_type
        if self.runtime_done_at is None:
            self._out.emit("platform.runtimeDone", **self._runtime_done(now))
        self.finish(now)

    def refuse(self, failure: FunctionFailure | LambdaFailure, status: str, version: str) -> None:
        """Answered without reaching the runtime (the Init it waited for failed, or the environment shut down first),
        and over at once."""
        self._out.emit("platform.start", requestId=self.request_id, version=version)
        self._out.add(f.Respond(self.request_id, failure))
        self.status, self.error_type = status, failure.error_type
        self._out.mark_invoke_end(self.request_id, status, failure.error_type)
        self._out.add(f.FinishInvoke(self.request_id, status, failure.error_type, 0.0, self.init_duration_ms))

    def _answer(self, request_id: str, now: float) -> None:
        if request_id != self.request_id:
            raise ApiError(400, ErrorType.INVALID_REQUEST_ID, f"no invoke in progress has request id {request_id!r}")
        if self.responded:
            raise ApiError(403, ErrorType.INVALID_STATE_TRANSITION, f"invoke {request_id} already has a response")
        self.responded = True
        self.response_at = now

    def _runtime_done(self, now: float) -> dict[str, Any]:
        """The ``platform.runtimeDone`` record, with the response's spans once it was posted."""
        fields: dict[str, Any] = {
            "requestId": self.request_id,
            "status": self.status,
            "metrics": {"durationMs": record.ms(now - self.started_at), "producedBytes": self.produced_bytes},
            "tracing": record.tracing(self.invoke.trace_id),
        }
        if self.error_type:
            fields["errorType"] = self.error_type
        if self.response_at is not None:
            first = self.first_byte_at or self.response_at
            fields["spans"] = [
                record.span("responseLatency", self.started_at, first),
                record.span("responseDuration", first, self.response_at),
            ]
        return fields
