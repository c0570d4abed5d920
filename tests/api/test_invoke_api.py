"""The Invoke API through boto3 as it is: invocation types, names and qualifiers, Tail logs, client context,
function and Lambda errors, and every service error the SDKs parse."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from lambdabox.api import invoke as invoke_api
from server_support import ARN, FUNCTIONS, TOO_MANY_EXTENSIONS, crowd_layer, serving, write_template
from support import run


def payload(response: dict[str, Any]) -> Any:
    return json.loads(response["Payload"].read())


def test_request_response_event_and_dry_run(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            client = served.client()
            sync = await asyncio.to_thread(client.invoke, FunctionName="Echo", Payload=b'{"n": 1}')
            assert sync["StatusCode"] == 200 and sync["ExecutedVersion"] == "$LATEST"
            assert "FunctionError" not in sync and "LogResult" not in sync
            answer = payload(sync)
            assert answer["event"] == {"n": 1} and answer["invoked_function_arn"] == ARN
            assert answer["request_id"] == sync["ResponseMetadata"]["RequestId"]
            assert answer["initialization_type"] == "on-demand"

            event = await asyncio.to_thread(client.invoke, FunctionName="Echo", InvocationType="Event", Payload=b"[2]")
            assert event["StatusCode"] == 202 and event["Payload"].read() == b""
            request_id = event["ResponseMetadata"]["RequestId"]
            await served.events.wait_for(lambda e: e.type == "platform.report" and e.record["requestId"] == request_id)

            dry = await asyncio.to_thread(client.invoke, FunctionName="Echo", InvocationType="DryRun", Payload=b"{}")
            assert dry["StatusCode"] == 204 and dry["Payload"].read() == b""
            empty = await asyncio.to_thread(client.invoke, FunctionName="Echo")
            assert payload(empty)["event"] == {}  # no payload: the function gets {}
            await served.server.wait_settled()
            assert served.events.count("platform.start") == 3  # sync, Event and the empty one; DryRun runs nothing

    run(main())


@pytest.mark.parametrize(
    ("name", "qualifier", "invoked"),
    [
        ("Echo", None, ARN),  # the logical id
        ("echo-fn", None, ARN),  # the FunctionName
        (ARN, None, ARN),
        ("123456789012:function:echo-fn", None, ARN),  # a partial ARN
        ("echo-fn:live", None, f"{ARN}:live"),  # an alias, taken to point at $LATEST
        (f"{ARN}:$LATEST", None, f"{ARN}:$LATEST"),
        ("echo-fn", "$LATEST", f"{ARN}:$LATEST"),
        ("echo-fn", "live", f"{ARN}:live"),
        ("echo-fn:live", "live", f"{ARN}:live"),
    ],
)
def test_function_names_arns_and_qualifiers(tmp_path: Path, name: str, qualifier: str | None, invoked: str) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            extra = {"Qualifier": qualifier} if qualifier else {}
            response = await asyncio.to_thread(served.client().invoke, FunctionName=name, Payload=b"{}", **extra)
            assert response["StatusCode"] == 200 and response["ExecutedVersion"] == "$LATEST"
            assert payload(response)["invoked_function_arn"] == invoked

    run(main())


def test_a_single_function_template_answers_the_emulator_path(tmp_path: Path) -> None:
    template = write_template(tmp_path, "Only:\n  Type: AWS::Serverless::Function\n  Properties: {Handler: handler.ok}")

    async def main() -> None:
        async with serving(template) as served:
            url = f"{served.server.url}/2015-03-31/functions/function/invocations"
            request = urllib.request.Request(url, data=b'{"via": "rie"}', method="POST")
            with await asyncio.to_thread(urllib.request.urlopen, request, timeout=30) as response:
                assert response.status == 200
                assert json.loads(response.read()) == {"ok": True, "event": {"via": "rie"}}

    run(main())


def test_tail_returns_the_last_4_kb_of_the_invoke_log(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            client = served.client()
            response = await asyncio.to_thread(client.invoke, FunctionName="Logs", LogType="Tail")
            request_id = response["ResponseMetadata"]["RequestId"]
            log = base64.b64decode(response["LogResult"]).decode()
            lines = log.splitlines()
            assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
            assert "line one" in lines and "first" in lines and "second" in lines
            assert lines[-2] == f"END RequestId: {request_id}"
            assert lines[-1].startswith(f"REPORT RequestId: {request_id}\tDuration: ")
            assert "module loaded" not in log  # Init's output belongs to no invoke

            lines_2000 = b'{"lines": 2000}'
            many = await asyncio.to_thread(client.invoke, FunctionName="Many", Payload=lines_2000, LogType="Tail")
            tail = base64.b64decode(many["LogResult"])
            assert len(tail) == 4096
            assert b"line 1999\n" in tail and b"line 1\n" not in tail
            assert tail.decode().splitlines()[-1].startswith("REPORT RequestId: ")
            assert payload(many) == "printed"

    run(main())


def test_client_context_reaches_the_runtime(tmp_path: Path) -> None:
    context = {"custom": {"tenant": "t-1"}, "client": {"installation_id": "install-7"}, "env": {"locale": "en"}}

    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            encoded = base64.b64encode(json.dumps(context).encode()).decode()
            response = await asyncio.to_thread(served.client().invoke, FunctionName="Echo", ClientContext=encoded)
            answer = payload(response)
            assert answer["custom"] == {"tenant": "t-1"} and answer["client"] == "install-7"

    run(main())


def test_function_errors_and_lambda_errors_are_200_with_unhandled(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            client = served.client()
            failed = await asyncio.to_thread(client.invoke, FunctionName="Fail")
            assert failed["StatusCode"] == 200 and failed["FunctionError"] == "Unhandled"
            error = payload(failed)
            assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"
            assert error["requestId"] == failed["ResponseMetadata"]["RequestId"]

            crashed = await asyncio.to_thread(client.invoke, FunctionName="Crash", Payload=b'{"code": 3}')
            assert crashed["StatusCode"] == 200 and crashed["FunctionError"] == "Unhandled"
            assert payload(crashed)["errorType"] == "Runtime.ExitError"

            timed_out = await asyncio.to_thread(client.invoke, FunctionName="Slow", Payload=b'{"seconds": 5}')
            assert timed_out["StatusCode"] == 200 and timed_out["FunctionError"] == "Unhandled"
            assert payload(timed_out)["errorType"] == "Sandbox.Timedout"

            again = await asyncio.to_thread(client.invoke, FunctionName="Slow", Payload=b'{"seconds": 0}')
            assert "FunctionError" not in again and payload(again) == "slept"  # the environment was reset

    run(main())


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        ({"FunctionName": "Nope"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "arn:aws:lambda:eu-west-1:123456789012:function:echo-fn"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "arn:aws:lambda:us-east-1:999999999999:function:echo-fn"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "echo-fn", "Qualifier": "7"}, 404, "ResourceNotFoundException"),  # no published versions
        ({"FunctionName": "echo-fn:a", "Qualifier": "b"}, 400, "InvalidParameterValueException"),
        ({"FunctionName": "Echo", "Payload": b"{not json"}, 400, "InvalidRequestContentException"),
        ({"FunctionName": "Echo", "ClientContext": "not base64!"}, 400, "InvalidRequestContentException"),
        ({"FunctionName": "Echo", "ClientContext": "WzFd"}, 400, "InvalidRequestContentException"),  # [1]: no object
        ({"FunctionName": "Echo", "ClientContext": "e30=" * 1000}, 400, "InvalidParameterValueException"),
        ({"FunctionName": "Echo", "InvocationType": "Later"}, 400, "ValidationException"),
        ({"FunctionName": "Echo", "LogType": "All"}, 400, "ValidationException"),
        ({"FunctionName": "Echo", "LogType": ""}, 400, "ValidationException"),  # sent empty: not absent
        ({"FunctionName": "Echo", "InvocationType": ""}, 400, "ValidationException"),
        ({"FunctionName": "Echo", "Payload": b"[" * 100_000 + b"]" * 100_000}, 400, "InvalidRequestContentException"),
        ({"FunctionName": "Echo", "Payload": b'"' + b"x" * (6 * 1024 * 1024) + b'"'}, 413, "RequestTooLargeException"),
        ({"FunctionName": "Echo", "InvocationType": "Event", "Payload": b'"' + b"x" * (1024 * 1024) + b'"'}, 413,
         "RequestTooLargeException"),
        ({"FunctionName": "Broken"}, 500, "ServiceException"),
    ],
)  # fmt: skip
def test_service_errors_as_the_sdk_parses_them(tmp_path: Path, call: dict[str, Any], status: int, code: str) -> None:
    crowd_layer(tmp_path)

    async def main() -> None:
        async with serving(write_template(tmp_path, TOO_MANY_EXTENSIONS)) as served:
            with pytest.raises(ClientError) as raised:
                await asyncio.to_thread(served.client().invoke, **call)
            response = raised.value.response
            assert response["Error"]["Code"] == code
            assert response["ResponseMetadata"]["HTTPStatusCode"] == status
            assert response["ResponseMetadata"]["RetryAttempts"] == 0
            assert response.get("Type") == (
                None if code == "ValidationException" else "User" if status < 500 else "Service"
            )
            assert response["Error"]["Message"]
            if code == "ServiceException":
                assert "at most 10" in response["Error"]["Message"]
                assert any("Broken" in line for line in served.reports)
            assert served.events.count("platform.start") == 0  # refused: nothing ran

    run(main())


def test_payloads_up_to_the_limits_are_accepted(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            client = served.client()
            event_max = b'"' + b"x" * (1024 * 1024 - 2) + b'"'
            call = {"FunctionName": "Echo", "InvocationType": "Event", "Payload": event_max}
            accepted = await asyncio.to_thread(client.invoke, **call)
            assert accepted["StatusCode"] == 202
            sync = b'"' + b"y" * (2 * 1024 * 1024) + b'"'  # above the Event limit, below the synchronous one
            response = await asyncio.to_thread(client.invoke, FunctionName="Logs", Payload=sync)
            assert response["StatusCode"] == 200 and payload(response) == "logged"
            await served.server.wait_settled()

    run(main())


def test_requests_refused_before_they_are_read_are_service_errors(tmp_path: Path) -> None:
    """A head over 1 MiB (431) and a connection over the cap (429): Lambda's error shape, as the SDKs parse it."""

    async def raw(address: tuple[str, int], data: bytes) -> tuple[int, str, dict[str, Any]]:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(data)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        rest = await asyncio.wait_for(reader.read(), 10)  # then the server closes
        writer.close()
        kind = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("x-amzn-ErrorType"))
        return int(head.split()[1]), kind, json.loads(rest)

    async def main() -> None:
        limits = invoke_api.limits()
        assert limits.request_timeout_s == limits.idle_timeout_s == 60  # (the defaults)
        async with serving(write_template(tmp_path, FUNCTIONS), limits=replace(limits, max_connections=3)) as served:
            address = ("127.0.0.1", served.server.address[1])
            path = "/2015-03-31/functions/Echo/invocations"
            big = f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * (1024 * 1024)}\r\n\r\n".encode()
            status, kind, body = await raw(address, big)
            assert (status, kind, body["Type"]) == (431, "RequestTooLargeException", "User")
            held = [await asyncio.open_connection(*address) for _ in range(3)]
            status, kind, body = await raw(address, f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (status, kind) == (429, "TooManyRequestsException") and "3 connections" in body["message"]
            for _, writer in held:
                writer.close()

    run(main())
