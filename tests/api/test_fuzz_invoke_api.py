"""The Invoke API under random methods, paths, function names, qualifiers, invocation headers and bodies, sent by
hypothesis to a live server: no 5xx, no traceback, every refusal in Lambda's shape (``x-amzn-ErrorType`` and a JSON
body), every 200 an invoke's one outcome; afterwards the server still serves."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import (
    Background,
    assert_well_formed,
    background,
    bodies,
    exchange,
    header_text,
    json_values,
    methods,
    raw_request,
    segment,
)
from lambdabox.service.server import Server, ServerSettings, open_server
from lambdabox.template.load import load_template
from server_support import write_template

TEMPLATE = """
Echo:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.context, FunctionName: echo-fn}
Fail:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.fail}
"""
NAMES = ["Echo", "echo-fn", "Fail", "function", "arn:aws:lambda:us-east-1:123456789012:function:echo-fn",
         "arn:aws:lambda:us-east-1:123456789012:function:echo-fn:$LATEST", "echo-fn:live", "echo-fn:7",
         "123456789012:function:Echo", "Nope"]  # fmt: skip
context = st.one_of(
    st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
        lambda v: base64.b64encode(json.dumps(v).encode())
    ),
    st.binary(max_size=200).map(base64.b64encode),
    header_text.map(str.encode),
).map(bytes.decode)


@contextlib.asynccontextmanager
async def _server(tmp_path: Path) -> AsyncIterator[Server]:
    settings = ServerSettings(destinations=tmp_path / "destinations.jsonl")
    async with open_server(load_template(write_template(tmp_path, TEMPLATE)), settings=settings) as server:
        yield server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    with background(lambda: _server(tmp_path_factory.mktemp("fuzz-invoke"))) as held:
        yield held


def mostly(draw: st.DrawFn, usual: st.SearchStrategy[str], anything: st.SearchStrategy[str]) -> str:
    """Four times in five a usual value (so that most requests reach an invoke), else anything."""
    return draw(usual if draw(st.integers(0, 4)) else anything)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    name = mostly(draw, st.sampled_from(NAMES), segment)
    shape = mostly(
        draw, st.just("/2015-03-31/functions/{}/invocations"), st.sampled_from(["/2015-03-31/functions/{}", "/{}"])
    )
    path = shape.format(name)
    if draw(st.booleans()):
        path += "?Qualifier=" + mostly(draw, st.sampled_from(["$LATEST", "live", "7"]), segment)
    method = mostly(draw, st.just("POST"), methods)
    headers = {}
    if draw(st.booleans()):
        usual = st.sampled_from(["RequestResponse", "Event", "DryRun"])
        headers["X-Amz-Invocation-Type"] = mostly(draw, usual, header_text)
    if draw(st.booleans()):
        headers["X-Amz-Log-Type"] = mostly(draw, st.sampled_from(["None", "Tail"]), header_text)
    if draw(st.integers(0, 3)) == 0:
        headers["X-Amz-Client-Context"] = draw(context)
    body = draw(json_values.map(lambda v: json.dumps(v).encode()) if draw(st.integers(0, 2)) else bodies)
    return method, path, headers, body


def test_fuzz_the_invoke_api(live: Background) -> None:
    server: Server = live.value
    address = ("127.0.0.1", server.address[1])

    @given(requests())
    def check(request: tuple[str, str, dict[str, str], bytes]) -> None:
        answer = exchange(address, raw_request(*request))
        assert_well_formed(answer)
        if answer.status >= 400 and request[1].startswith("/2015-03-31/functions/") and answer.status not in (404, 405):
            assert answer.headers.get("x-amzn-errortype"), answer  # a refusal the SDKs can name
        if answer.status == 200:
            assert answer.headers.get("x-amzn-requestid") and answer.headers.get("x-amz-executed-version") == "$LATEST"
            function_error = answer.headers.get("x-amz-function-error")
            assert function_error in (None, "Unhandled")
            if function_error:
                assert set(json.loads(answer.body)) >= {"errorMessage", "errorType"}

    check()


def test_the_server_still_serves_after_the_fuzz(live: Background) -> None:
    server: Server = live.value
    request = raw_request("POST", "/2015-03-31/functions/Echo/invocations", {}, b'{"after": "fuzz"}')
    answer = exchange(("127.0.0.1", server.address[1]), request)
    assert answer.status == 200 and json.loads(answer.body)["event"] == {"after": "fuzz"}
