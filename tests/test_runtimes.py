"""The runtimes end to end: a wrapper script, the Node.js runtime (aws-lambda-ric) and a custom `bootstrap`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lambdabox.core.model import FunctionConfig, FunctionFailure, LayerConfig, Response
from lambdabox.environment.opening import open_environment
from lambdabox.environment.report import InvokeResult
from lambdabox.sandbox.runtime import find_node_ric
from support import Recorder, build_layer, make_function, run


def invoke_all(config: FunctionConfig, payloads: list[object], recorder: Recorder | None = None) -> list[InvokeResult]:
    async def go() -> list[InvokeResult]:
        async with open_environment(config, None, [recorder] if recorder else []) as env:
            return [await env.invoke(json.dumps(p).encode()) for p in payloads]

    return run(go())


def test_exec_wrapper_runs_before_the_runtime(tmp_path: Path, recorder: Recorder) -> None:
    wrapper = b'#!/bin/sh\nexport WRAPPED_BY=wrapper\necho "wrapping $_HANDLER"\nexec "$@"\n'
    layer = LayerConfig("wrapper", build_layer(tmp_path / "w.zip", {"wrapper.sh": (wrapper, 0o755)}))
    config = make_function(
        tmp_path,
        "handler.echo_env",
        layers=(layer,),
        environment={"AWS_LAMBDA_EXEC_WRAPPER": "/opt/wrapper.sh"},
    )
    (result,) = invoke_all(config, [{"keys": ["WRAPPED_BY"]}], recorder)
    assert isinstance(result.outcome, Response)
    assert json.loads(result.outcome.body)["WRAPPED_BY"] == "wrapper"
    assert "wrapping handler.echo_env" in recorder.lines("runtime")


def _node_available() -> bool:
    try:
        find_node_ric()
    except Exception:
        return False
    return shutil.which("node") is not None


@pytest.mark.node
@pytest.mark.skipif(not _node_available(), reason="aws-lambda-ric is not installed: run scripts/install-node-ric.sh")
def test_node_runtime(tmp_path: Path, recorder: Recorder) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "index.js").write_text(
        "console.log('node module loaded');\n"
        "exports.handler = async (event, context) => {\n"
        "  console.log('multi\\nline');\n"
        "  if (event.fail) { throw new TypeError('node boom'); }\n"
        "  return { node: process.version, got: event, fn: context.functionName };\n"
        "};\n"
    )
    config = FunctionConfig("Node", "Node", "nodejs20.x", "index.handler", code)
    ok, failed = invoke_all(config, [{"a": 1}, {"fail": True}], recorder)
    assert isinstance(ok.outcome, Response), ok.outcome
    answer = json.loads(ok.outcome.body)
    assert answer["got"] == {"a": 1} and answer["fn"] == "Node" and answer["node"].startswith("v")
    assert isinstance(failed.outcome, FunctionFailure)
    assert json.loads(failed.outcome.body)["errorType"] == "TypeError"
    assert any("node module loaded" in line for line in recorder.lines("runtime"))
    assert any("multi\nline" in line for line in recorder.lines("runtime"))  # one record through the log fd


BOOTSTRAP = b"""#!/bin/sh
# A custom runtime in shell: the Runtime API loop with curl.
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
echo "bootstrap started for $_HANDLER"
while true; do
  HEADERS=$(mktemp)
  EVENT=$(curl -sS -D "$HEADERS" "$API/invocation/next")
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | tr -d '\\r' | cut -d' ' -f2)
  rm -f "$HEADERS"
  curl -sS -o /dev/null -X POST "$API/invocation/$ID/response" -d "{\\"echo\\": $EVENT}"
done
"""


@pytest.mark.parametrize("where", ["task", "layer"])
def test_custom_runtime_bootstrap(tmp_path: Path, recorder: Recorder, where: str) -> None:
    code = tmp_path / "code"
    code.mkdir()
    layers: tuple[LayerConfig, ...] = ()
    if where == "task":
        (code / "bootstrap").write_bytes(BOOTSTRAP)
        (code / "bootstrap").chmod(0o755)
    else:
        layers = (LayerConfig("rt", build_layer(tmp_path / "rt.zip", {"bootstrap": (BOOTSTRAP, 0o755)})),)
    config = FunctionConfig("Custom", "Custom", "provided.al2023", "my.handler", code, layers)
    first, second = invoke_all(config, [{"n": 1}, {"n": 2}], recorder)
    assert isinstance(first.outcome, Response) and isinstance(second.outcome, Response)
    assert json.loads(first.outcome.body) == {"echo": {"n": 1}}
    assert json.loads(second.outcome.body) == {"echo": {"n": 2}}
    assert "bootstrap started for my.handler" in recorder.lines("runtime")


TUTORIAL_BOOTSTRAP = b"""#!/bin/sh
set -euo pipefail
# The bootstrap of Lambda's custom runtime tutorial, as written there: /bin/sh is bash on Amazon Linux.
source $LAMBDA_TASK_ROOT/"$(echo $_HANDLER | cut -d. -f1).sh"
while true
do
  HEADERS="$(mktemp)"
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA")
  curl -sS "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" -d "$RESPONSE"
done
"""
TUTORIAL_FUNCTION = b"""function handler () {
  EVENT_DATA=$1
  echo "{\\"statusCode\\": 200, \\"body\\": \\"Hello from Lambda! $(id -un)\\"}"
}
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="the tutorial's bootstrap needs curl")
def test_the_custom_runtime_tutorials_bash_bootstrap_runs_as_written(tmp_path: Path, recorder: Recorder) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "bootstrap").write_bytes(TUTORIAL_BOOTSTRAP)
    (code / "bootstrap").chmod(0o755)
    (code / "function.sh").write_bytes(TUTORIAL_FUNCTION)
    config = FunctionConfig("Tutorial", "Tutorial", "provided.al2023", "function.handler", code)
    (result,) = invoke_all(config, [{}], recorder)
    assert isinstance(result.outcome, Response), result.outcome
    answer = json.loads(result.outcome.body)
    assert answer["statusCode"] == 200 and answer["body"].startswith("Hello from Lambda! ")
    if os.geteuid() == 0:  # in the sandbox (the suite runs as root): Lambda's user
        assert answer["body"] == "Hello from Lambda! sbx_user1051"
