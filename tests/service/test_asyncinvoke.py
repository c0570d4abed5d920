"""Asynchronous invokes through boto3: Lambda's retries and delays (shortened), the maximum event age, and the
invocation records sent to destinations (another function of the template, or the JSON lines file)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lambdabox.service.asyncinvoke import RETRY_DELAYS_S
from server_support import Served, serving, write_template
from support import run

SCALE = 0.01  # retry delays of 0.6 s and 1.2 s
QUEUE = "arn:aws:sqs:us-east-1:123456789012:Records"

CHAIN = """
Records:
  Type: AWS::SQS::Queue
Fail:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.fail
    EventInvokeConfig:
      DestinationConfig:
        OnSuccess: {Type: SQS, Destination: !GetAtt Records.Arn}
        OnFailure: {Type: Lambda, Destination: !GetAtt Sink.Arn}
Sink:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.ok
    FunctionName: sink-fn
    EventInvokeConfig:
      MaximumRetryAttempts: 0
      DestinationConfig:
        OnSuccess: {Type: SQS, Destination: !GetAtt Records.Arn}
"""


async def invoke_event(served: Served, name: str, payload: Any) -> str:
    call = {"FunctionName": name, "InvocationType": "Event", "Payload": json.dumps(payload).encode()}
    response = await asyncio.to_thread(served.client().invoke, **call)
    assert response["StatusCode"] == 202
    request_id: str = response["ResponseMetadata"]["RequestId"]
    return request_id


def starts(served: Served, request_id: str) -> list[float]:
    return [e.time for e in served.events.events if e.type == "platform.start" and e.record["requestId"] == request_id]


def test_a_failing_event_is_retried_twice_then_recorded_to_the_on_failure_function(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, CHAIN), time_scale=SCALE) as served:
            request_id = await invoke_event(served, "Fail", {"order": 7})
            await served.server.wait_settled()
            attempts = starts(served, request_id)  # the same request id on every attempt, as in Lambda
            assert len(attempts) == 3
            assert attempts[1] - attempts[0] >= RETRY_DELAYS_S[0] * SCALE
            assert attempts[2] - attempts[1] >= RETRY_DELAYS_S[1] * SCALE
            [line] = served.destination_records()
            assert line["destination"] == QUEUE
            sink_record = line["record"]  # Sink's own Success record: it returned {"ok": true, "event": <record>}
            assert sink_record["requestContext"]["functionArn"].endswith(":function:sink-fn:$LATEST")
            assert sink_record["requestContext"]["condition"] == "Success"
            record = sink_record["responsePayload"]["event"]
            assert record["version"] == "1.0" and record["timestamp"].endswith("Z")
            assert record["requestContext"] == {
                "requestId": request_id,
                "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:Fail:$LATEST",
                "condition": "RetriesExhausted",
                "approximateInvokeCount": 3,
            }
            assert record["requestPayload"] == {"order": 7}
            assert record["responseContext"] == {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled",
            }
            assert record["responsePayload"]["errorType"] == "ValueError"
            assert record["responsePayload"]["errorMessage"] == "boom"

    run(main())


SUCCESS = """
Ok:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.ok
    EventInvokeConfig:
      DestinationConfig:
        OnSuccess: {Type: SNS}
"""


def test_a_successful_event_is_recorded_to_the_on_success_destination(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, SUCCESS), time_scale=SCALE) as served:
            request_id = await invoke_event(served, "Ok", {"n": 1})
            await served.server.wait_settled()
            [line] = served.destination_records()
            assert line["destination"] == "arn:aws:sns:us-east-1:123456789012:OkEventInvokeConfigOnSuccessTopic"
            record = line["record"]
            assert record["requestContext"]["requestId"] == request_id
            assert record["requestContext"]["condition"] == "Success"
            assert record["requestContext"]["approximateInvokeCount"] == 1
            assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
            assert record["responsePayload"] == {"ok": True, "event": {"n": 1}}
            tally = served.server.queues["Ok"].tally
            assert (tally.accepted, tally.succeeded, tally.failed, tally.attempts) == (1, 1, 0, 1)

    run(main())


LAMBDA_ERRORS = """
Crash:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.crash
    EventInvokeConfig:
      MaximumRetryAttempts: 1
      DestinationConfig:
        OnFailure: {Type: EventBridge, Destination: arn:aws:events:us-east-1:123456789012:event-bus/default}
Old:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.fail
    EventInvokeConfig:
      MaximumEventAgeInSeconds: 60
      DestinationConfig:
        OnFailure: {Type: SQS, Destination: !GetAtt Records.Arn}
Records:
  Type: AWS::SQS::Queue
"""


def by_function(served: Served) -> dict[str, dict[str, Any]]:
    return {
        line["record"]["requestContext"]["functionArn"].split(":")[6]: line for line in served.destination_records()
    }


def test_lambda_errors_are_retried_and_old_events_are_dropped_to_on_failure(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, LAMBDA_ERRORS), time_scale=SCALE) as served:
            crash_id = await invoke_event(served, "Crash", {"code": 2})
            old_id = await invoke_event(served, "Old", {})
            await served.server.wait_settled()
            lines = by_function(served)
            crash = lines["Crash"]
            assert crash["destination"] == "arn:aws:events:us-east-1:123456789012:event-bus/default"
            assert crash["record"]["requestContext"]["approximateInvokeCount"] == 2  # MaximumRetryAttempts: 1
            assert crash["record"]["responsePayload"]["errorType"] == "Runtime.ExitError"
            assert len(starts(served, crash_id)) == 2
            # Old's retry is due after 60 s (scaled), when the event is 60 s old (scaled): too old to run again.
            old = lines["Old"]["record"]
            assert old["requestContext"]["condition"] == "EventAgeExceeded"
            assert old["requestContext"]["approximateInvokeCount"] == 1
            assert len(starts(served, old_id)) == 1

    run(main())


ZERO = """
Off:
  Type: AWS::Serverless::Function
  Properties:
    Handler: handler.ok
    ReservedConcurrentExecutions: 0
    EventInvokeConfig:
      DestinationConfig:
        OnFailure: {Type: SQS, Destination: arn:aws:sqs:us-east-1:123456789012:dlq}
"""


def test_reserved_concurrency_zero_throttles_and_sends_events_to_on_failure(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, ZERO), time_scale=SCALE) as served:
            with pytest.raises(ClientError) as raised:
                await asyncio.to_thread(served.client().invoke, FunctionName="Off")
            assert raised.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
            request_id = await invoke_event(served, "Off", {"x": 1})
            await served.server.wait_settled()
            [line] = served.destination_records()
            assert line["record"]["requestContext"]["requestId"] == request_id
            assert line["record"]["requestContext"]["approximateInvokeCount"] == 0
            assert "responseContext" not in line["record"]
            assert served.events.count("platform.start") == 0

    run(main())


def test_events_still_queued_at_exit_are_counted_not_lost(tmp_path: Path) -> None:
    async def main() -> Served:
        async with serving(write_template(tmp_path, CHAIN), time_scale=1.0) as served:
            request_id = await invoke_event(served, "Fail", {})
            # The first attempt fails; its retry is due in a minute, and the server exits before that.
            await served.events.wait_for(lambda e: e.type == "platform.report" and e.record["requestId"] == request_id)
        return served

    served = run(main())
    tally = served.server.queues["Fail"].tally
    assert (tally.accepted, tally.attempts, tally.unprocessed) == (1, 1, 1)
    assert any("1 queued asynchronous invokes were not run" in line for line in served.reports)
