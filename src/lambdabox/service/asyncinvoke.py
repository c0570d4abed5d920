"""Asynchronous (``Event``) invokes: a queue per function drained as its concurrency allows, Lambda's retries and
maximum event age, and the invocation records sent to the OnSuccess and OnFailure destinations. The dispatcher and
the attempts are tasks of the group the queue is given.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lambdabox.core import jsontext
from lambdabox.core.errors import ErrorType, error_body
from lambdabox.core.model import LATEST, FunctionConfig, FunctionFailure, LambdaFailure, Outcome, Response
from lambdabox.service.pool import Pool

RETRY_DELAYS_S = (60.0, 120.0)  # Lambda waits 1 minute before the first retry, 2 minutes before the second
SUCCESS, RETRIES_EXHAUSTED, EVENT_AGE_EXCEEDED = "Success", "RetriesExhausted", "EventAgeExceeded"

Deliver = Callable[[str, dict[str, Any]], None]
"""(destination ARN or function name, invocation record) -> None."""


@dataclass(eq=False)
class _Event:
    request_id: str  # the same for every attempt, as in Lambda
    payload: bytes
    received: float  # monotonic
    attempts: int = 0
    last: Outcome | None = None


@dataclass
class Tally:
    """What became of the events this queue accepted (tests account for every one)."""

    accepted: int = 0
    succeeded: int = 0
    failed: int = 0  # retries exhausted, or too old
    attempts: int = 0
    unprocessed: int = 0  # still queued or waiting for a retry when the queue closed
    conditions: dict[str, int] = field(default_factory=dict)


class EventQueue:
    """One function's asynchronous invokes, from ``put`` to a destination record (or a discard). Its tasks never
    raise: what goes wrong is told to ``log``."""

    def __init__(
        self,
        pool: Pool,
        deliver: Deliver,
        group: asyncio.TaskGroup,
        *,
        time_scale: float = 1.0,
        log: Callable[[str], None],
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be above 0 (an event of age 0 would be too old), not {time_scale}")
        self.pool = pool
        self.config: FunctionConfig = pool.config
        self.deliver = deliver
        self.time_scale = time_scale
        self.log = log
        self.tally = Tally()
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._retries: dict[_Event, asyncio.TimerHandle] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._settled = asyncio.Event()
        self._settled.set()
        self._pending = 0
        self._closed = False
        self._group = group
        self._dispatcher = group.create_task(self._dispatch())

    def put(self, payload: bytes) -> str:
        """Queue an event (Lambda has answered 202 by then); returns its request id."""
        event = _Event(str(uuid.uuid4()), payload, time.monotonic())
        self.tally.accepted += 1
        if self._closed:
            self.tally.unprocessed += 1
            self.log(f"lambdabox: {self.config.logical_id}: event {event.request_id} not run (shutting down)")
            return event.request_id
        self._pending += 1
        self._settled.clear()
        self._queue.put_nowait(event)
        return event.request_id

    async def wait_settled(self) -> None:
        """Wait until every event accepted so far has reached its end (success, or a failure after retries)."""
        await self._settled.wait()

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    def stop(self) -> None:
        """Start no more attempts: queued events and retries stay where they are (and are counted at close)."""
        self._closed = True
        self._dispatcher.cancel()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    async def close(self) -> None:
        """``stop``, and let the attempts in flight finish (within their deadlines)."""
        self.stop()
        while self._attempts:
            await asyncio.wait(set(self._attempts))
        unprocessed = self._pending
        self.tally.unprocessed += unprocessed
        if unprocessed:
            self.log(f"lambdabox: {self.config.logical_id}: {unprocessed} queued asynchronous invokes were not run")

    # ---- the queue --------------------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            while True:
                await self._start(await self._queue.get())
        except Exception as error:  # e.g. the pool closed under it: the events left are counted as not run
            self._closed = True
            self.log(f"lambdabox: {self.config.logical_id}: the queue of asynchronous invokes stopped: {error!r}")

    async def _start(self, event: _Event) -> None:
        """Start an attempt for ``event`` once a unit of concurrency is free, or finish it (too old, or throttled)."""
        remaining = self.config.event_invoke.maximum_event_age_s * self.time_scale - (time.monotonic() - event.received)
        if remaining <= 0:
            self._finish(event, EVENT_AGE_EXCEEDED)
            return
        if self.config.reserved_concurrency == 0:  # Lambda sends such events to OnFailure, without retries
            self._finish(event, RETRIES_EXHAUSTED)
            return
        try:
            await self.pool.reserve_waiting(remaining)  # Lambda retries throttles until the event is too old
        except TimeoutError:
            self._finish(event, EVENT_AGE_EXCEEDED)
            return
        task = self._group.create_task(self._attempt(event))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _attempt(self, event: _Event) -> None:
        try:
            await self._run(event)
        except Exception as error:  # lambdabox's bug (or a destination's): told, never raised into the group
            self.log(f"lambdabox: {self.config.logical_id}: event {event.request_id}: {error!r}")

    async def _run(self, event: _Event) -> None:
        event.attempts += 1
        self.tally.attempts += 1
        try:
            ran = await self.pool.run(event.payload, request_id=event.request_id, invoked_function_arn=self.config.arn)
            event.last = ran.result.outcome
        except Exception as error:  # the environment could not run it: a Lambda error, retried like one
            event.last = LambdaFailure(ErrorType.SERVICE, f"lambdabox could not run the invoke: {error!r}")
        if isinstance(event.last, Response):
            self._finish(event, SUCCESS)
        elif event.attempts > self.config.event_invoke.maximum_retry_attempts:
            self._finish(event, RETRIES_EXHAUSTED)
        elif not self._closed:  # else it stays pending, and is counted as not run
            delay = RETRY_DELAYS_S[min(event.attempts, len(RETRY_DELAYS_S)) - 1] * self.time_scale
            self._retries[event] = asyncio.get_running_loop().call_later(delay, self._retry, event)

    def _retry(self, event: _Event) -> None:
        del self._retries[event]
        self._queue.put_nowait(event)

    def _finish(self, event: _Event, condition: str) -> None:
        self.tally.conditions[condition] = self.tally.conditions.get(condition, 0) + 1
        if condition == SUCCESS:
            self.tally.succeeded += 1
        else:
            self.tally.failed += 1
        destination = (
            self.config.event_invoke.on_success if condition == SUCCESS else self.config.event_invoke.on_failure
        )
        try:
            if destination is not None:
                self.deliver(destination, invocation_record(self.config, event, condition))
            elif condition != SUCCESS:
                self.log(f"lambdabox: {self.config.logical_id}: event {event.request_id} discarded ({condition})")
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._settled.set()


def invocation_record(config: FunctionConfig, event: _Event, condition: str) -> dict[str, Any]:
    """Lambda's record for a destination: what was asked, what came of it, and why it is sent."""
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": event.request_id,
            "functionArn": f"{config.arn}:{LATEST}",
            "condition": condition,
            "approximateInvokeCount": event.attempts,
        },
        "requestPayload": _json_or_text(event.payload),
    }
    if event.last is not None:
        context: dict[str, Any] = {"statusCode": 200, "executedVersion": LATEST}
        match event.last:
            case Response(body=body):
                payload = _json_or_text(body)
            case FunctionFailure(body=body):
                context["functionError"] = "Unhandled"
                payload = _json_or_text(body)
            case LambdaFailure(error_type=error_type, message=message):
                context["functionError"] = "Unhandled"
                payload = json.loads(error_body(error_type, message))
        record["responseContext"] = context
        record["responsePayload"] = payload
    return record


def _json_or_text(data: bytes) -> Any:
    try:
        return jsontext.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")
