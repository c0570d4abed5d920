"""The Invoke API through the AWS SDK for JavaScript v3 as it is (@aws-sdk/client-lambda's InvokeCommand, run by Node
from tests/fixtures/invoke_js.mjs): invocation types, names and qualifiers, Tail logs, client context, function
errors and the service errors the SDK parses. The same template and cases as the boto3 tests (test_invoke_api.py).

Needs Node.js and the SDK: run scripts/install-node-sdk.sh (./dev test does)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from server_support import ARN, FUNCTIONS, READ_TIMEOUT_S, TOO_MANY_EXTENSIONS, crowd_layer, serving, write_template
from support import FIXTURES, run

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = Path(os.environ.get("LAMBDABOX_NODE_SDK_DIR") or REPO / ".lambdabox" / "node-sdk")
NODE = shutil.which("node")
if NODE is None:
    pytest.skip("node is not on PATH", allow_module_level=True)
if not (SDK_DIR / "node_modules" / "@aws-sdk" / "client-lambda" / "package.json").is_file():
    pytest.skip(f"@aws-sdk/client-lambda is not installed in {SDK_DIR}: run scripts/install-node-sdk.sh",
                allow_module_level=True)  # fmt: skip

pytestmark = pytest.mark.node
SCRIPT = FIXTURES / "invoke_js.mjs"


async def invoke_js(url: str, payload: str | None = None, **command: str) -> dict[str, Any]:
    """One ``InvokeCommand(command)`` with ``payload`` (UTF-8) through the JS SDK, in a Node process: its output
    (``Payload`` decoded to text, ``$metadata``) or, for a service error, ``{"error": {name, httpStatusCode, ...}}``.
    The SDK runs with explicit endpoint, region, credentials and no retries; the host's ``AWS_*`` settings are
    kept from it."""
    request = {"endpoint": url, "timeoutMs": READ_TIMEOUT_S * 1000, "payload": payload, "input": command}
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED"] = "true"  # the SDK's notice about Node < 22
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        str(SDK_DIR),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await process.communicate(json.dumps(request).encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    (line,) = out.decode().splitlines()
    result: dict[str, Any] = json.loads(line)
    return result


def test_request_response_echoes_the_payload(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            url = served.server.url
            sync = await invoke_js(url, '{"n": 1, "text": "café ☃"}', FunctionName="Echo")
            assert sync["StatusCode"] == 200 and sync["ExecutedVersion"] == "$LATEST"
            assert "FunctionError" not in sync and "LogResult" not in sync
            assert sync["$metadata"]["httpStatusCode"] == 200 and sync["$metadata"]["attempts"] == 1
            answer = json.loads(sync["Payload"])
            assert answer["event"] == {"n": 1, "text": "café ☃"} and answer["invoked_function_arn"] == ARN
            assert answer["request_id"] == sync["$metadata"]["requestId"]  # x-amzn-RequestId is the invoke's id

            empty = await invoke_js(url, FunctionName="Echo")  # no Payload: the function gets {}
            assert json.loads(empty["Payload"])["event"] == {}

    run(main())


@pytest.mark.parametrize(
    ("name", "qualifier", "invoked"),
    [
        ("echo-fn", None, ARN),  # the FunctionName
        (f"{ARN}:$LATEST", None, f"{ARN}:$LATEST"),  # the SDK sends it as arn%3Aaws...%3A%24LATEST
        ("123456789012:function:echo-fn:live", None, f"{ARN}:live"),  # a partial ARN with an alias
        ("echo-fn", "live", f"{ARN}:live"),  # ?Qualifier=live
    ],
)
def test_function_names_arns_and_qualifiers(tmp_path: Path, name: str, qualifier: str | None, invoked: str) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            extra = {"Qualifier": qualifier} if qualifier else {}
            response = await invoke_js(served.server.url, "{}", FunctionName=name, **extra)
            assert response["StatusCode"] == 200 and response["ExecutedVersion"] == "$LATEST"
            assert json.loads(response["Payload"])["invoked_function_arn"] == invoked

    run(main())


def test_event_is_202_and_runs_dry_run_is_204_and_does_not(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            url = served.server.url
            event = await invoke_js(url, "[2]", FunctionName="Echo", InvocationType="Event")
            assert event["StatusCode"] == 202 and event["Payload"] is None  # an empty body
            assert "ExecutedVersion" not in event and "FunctionError" not in event
            request_id = event["$metadata"]["requestId"]
            await served.events.wait_for(lambda e: e.type == "platform.report" and e.record["requestId"] == request_id)

            dry = await invoke_js(url, "{}", FunctionName="Echo", InvocationType="DryRun")
            assert dry["StatusCode"] == 204 and dry["Payload"] is None
            await served.server.wait_settled()
            assert served.events.count("platform.start") == 1  # the Event; DryRun runs nothing

    run(main())


def test_tail_returns_the_invoke_log(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            response = await invoke_js(served.server.url, FunctionName="Logs", LogType="Tail")
            request_id = response["$metadata"]["requestId"]
            lines = base64.b64decode(response["LogResult"]).decode().splitlines()
            assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
            assert "line one" in lines and "first" in lines and "second" in lines
            assert lines[-2] == f"END RequestId: {request_id}"
            assert lines[-1].startswith(f"REPORT RequestId: {request_id}\tDuration: ")
            assert json.loads(response["Payload"]) == "logged"

    run(main())


def test_client_context_reaches_the_runtime(tmp_path: Path) -> None:
    context = {"custom": {"tenant": "t-1"}, "client": {"installation_id": "install-7"}, "env": {"locale": "en"}}

    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            encoded = base64.b64encode(json.dumps(context).encode()).decode()
            response = await invoke_js(served.server.url, FunctionName="Echo", ClientContext=encoded)
            answer = json.loads(response["Payload"])
            assert answer["custom"] == {"tenant": "t-1"} and answer["client"] == "install-7"

    run(main())


def test_function_errors_and_lambda_errors_are_200_with_unhandled(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(write_template(tmp_path, FUNCTIONS)) as served:
            url = served.server.url
            failed = await invoke_js(url, FunctionName="Fail")
            assert failed["StatusCode"] == 200 and failed["FunctionError"] == "Unhandled"
            assert "error" not in failed  # not a service error: the SDK resolves, the caller reads FunctionError
            error = json.loads(failed["Payload"])
            assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"
            assert error["requestId"] == failed["$metadata"]["requestId"]

            crashed = await invoke_js(url, '{"code": 3}', FunctionName="Crash")
            assert crashed["StatusCode"] == 200 and crashed["FunctionError"] == "Unhandled"
            assert json.loads(crashed["Payload"])["errorType"] == "Runtime.ExitError"

            timed_out = await invoke_js(url, '{"seconds": 5}', FunctionName="Slow")  # Timeout: 1
            assert timed_out["StatusCode"] == 200 and timed_out["FunctionError"] == "Unhandled"
            assert json.loads(timed_out["Payload"])["errorType"] == "Sandbox.Timedout"

    run(main())


SIX_MB = '"' + "x" * (6 * 1024 * 1024) + '"'
ONE_MB = '"' + "x" * (1024 * 1024) + '"'


@pytest.mark.parametrize(
    ("call", "status", "name"),
    [
        ({"FunctionName": "Nope"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "echo-fn", "Qualifier": "7"}, 404, "ResourceNotFoundException"),  # no published versions
        ({"FunctionName": "echo-fn:a", "Qualifier": "b"}, 400, "InvalidParameterValueException"),
        ({"FunctionName": "Echo", "payload": "{not json"}, 400, "InvalidRequestContentException"),  # the SDK sends it
        ({"FunctionName": "Echo", "ClientContext": "not base64!"}, 400, "InvalidRequestContentException"),
        ({"FunctionName": "Echo", "ClientContext": "e30=" * 1000}, 400, "InvalidParameterValueException"),
        ({"FunctionName": "Echo", "InvocationType": "Later"}, 400, "ValidationException"),
        ({"FunctionName": "Echo", "LogType": "All"}, 400, "ValidationException"),
        ({"FunctionName": "Echo", "payload": SIX_MB}, 413, "RequestTooLargeException"),
        ({"FunctionName": "Echo", "InvocationType": "Event", "payload": ONE_MB}, 413, "RequestTooLargeException"),
        ({"FunctionName": "Broken"}, 500, "ServiceException"),
    ],
    ids=["unknown", "version", "qualifiers", "not-json", "context-base64", "context-long", "invocation-type",
         "log-type", "6mb", "event-1mb", "service"],
)  # fmt: skip
def test_service_errors_as_the_sdk_parses_them(tmp_path: Path, call: dict[str, str], status: int, name: str) -> None:
    crowd_layer(tmp_path)

    async def main() -> None:
        async with serving(write_template(tmp_path, TOO_MANY_EXTENSIONS)) as served:
            error = (await invoke_js(served.server.url, **call))["error"]
            assert error["name"] == name and error["httpStatusCode"] == status
            assert error["attempts"] == 1  # nothing retried, not even the 500
            assert error["fault"] == ("server" if status >= 500 else "client")
            kind = None if name == "ValidationException" else "User" if status < 500 else "Service"
            assert error.get("type") == kind
            assert error["message"] and error["requestId"]
            if name == "ResourceNotFoundException" and call["FunctionName"] == "Nope":
                assert error["message"].endswith(":function:Nope")
            if name == "ServiceException":
                assert "at most 10" in error["message"]
            assert served.events.count("platform.start") == 0  # refused: nothing ran

    run(main())
