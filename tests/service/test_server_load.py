"""1,000 mixed invokes through boto3 (synchronous, function errors, asynchronous with retries and destinations),
eight at a time, with every one accounted for: each answer, each destination record, each START and REPORT."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server_support import serving, write_template
from support import run

TOTAL = 1000
CLIENTS = 8
MIX = """
Mix:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.echo_or_fail}
Later:
  Type: AWS::Serverless::Function
  Properties:
    Handler: invoke_handler.echo_or_fail
    ReservedConcurrentExecutions: 4
    EventInvokeConfig:
      MaximumRetryAttempts: 1
      DestinationConfig:
        OnSuccess: {Type: SQS, Destination: !GetAtt Done.Arn}
        OnFailure: {Type: SQS, Destination: !GetAtt Failed.Arn}
Done:
  Type: AWS::SQS::Queue
Failed:
  Type: AWS::SQS::Queue
"""


def plan(index: int) -> tuple[str, bool]:
    """Of every 10: 6 synchronous successes, 2 synchronous function errors, 1 asynchronous success, 1 failure."""
    kind = index % 10
    return ("Event" if kind >= 8 else "RequestResponse"), kind in (6, 7, 9)


def test_a_thousand_mixed_invokes_are_all_accounted_for(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, MIX), time_scale=0.001) as served:
            client = served.client()

            def call(index: int) -> tuple[int, dict[str, Any], Any]:
                kind, fail = plan(index)
                payload = json.dumps({"id": index, "fail": fail}).encode()
                name = "Later" if kind == "Event" else "Mix"
                response = client.invoke(FunctionName=name, InvocationType=kind, Payload=payload)
                body = response["Payload"].read()
                return index, response, json.loads(body) if body else None

            started = time.monotonic()
            with ThreadPoolExecutor(CLIENTS) as executor:
                results = await asyncio.to_thread(lambda: list(executor.map(call, range(TOTAL))))
            await served.server.wait_settled()
            elapsed = time.monotonic() - started

            request_ids = [response["ResponseMetadata"]["RequestId"] for _, response, _ in results]
            assert len(set(request_ids)) == TOTAL
            for index, response, body in results:
                kind, fail = plan(index)
                if kind == "Event":
                    assert response["StatusCode"] == 202 and body is None
                elif fail:
                    assert response["StatusCode"] == 200 and response["FunctionError"] == "Unhandled"
                    assert body["errorMessage"] == f"failing {index}"
                else:
                    assert response["StatusCode"] == 200 and "FunctionError" not in response
                    assert body == {"id": index}

            lines = served.destination_records()
            assert len(lines) == TOTAL // 5
            outcomes = {line["record"]["requestPayload"]["id"]: line for line in lines}
            assert set(outcomes) == {i for i in range(TOTAL) if plan(i)[0] == "Event"}
            for index, line in outcomes.items():
                context = line["record"]["requestContext"]
                if plan(index)[1]:
                    assert line["destination"].endswith(":Failed") and context["condition"] == "RetriesExhausted"
                    assert context["approximateInvokeCount"] == 2
                else:
                    assert line["destination"].endswith(":Done") and context["condition"] == "Success"
                    assert line["record"]["responsePayload"] == {"id": index}

            attempts = 8 * TOTAL // 10 + TOTAL // 10 + 2 * TOTAL // 10  # sync, async successes, failures twice
            assert served.events.count("platform.start") == served.events.count("platform.report") == attempts
            statuses = Counter(record["status"] for record in served.events.records("platform.report"))
            assert statuses == {"success": 7 * TOTAL // 10, "error": 4 * TOTAL // 10}  # function errors: "error"
            tally = served.server.queues["Later"].tally
            assert (tally.accepted, tally.succeeded, tally.failed, tally.unprocessed) == (200, 100, 100, 0)
            assert served.server.pools["Later"].environments <= 4
            assert served.server.capacity.in_use == 0
            print(f"\n{TOTAL} invokes in {elapsed:.1f} s ({TOTAL / elapsed:.0f}/s), "
                  f"{served.events.count('platform.initStart')} environments")  # fmt: skip

    run(main(), timeout=120)
