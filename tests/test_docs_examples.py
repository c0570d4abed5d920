"""The README's "Test with pytest" examples run as a user runs them: each python block is a test file, the toml
block the project's pytest configuration, next to the extension layer, template and code they name."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from lambdabox.testing import PYTHON_RUNTIME

pytest_plugins = ["pytester"]

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Test with pytest"
HOME = os.environ["HOME"]  # pytester moves HOME under /tmp, which an isolated environment does not see

# The extension the first example tests: registers for INVOKE and SHUTDOWN, subscribes to the Telemetry API and
# prints the type of every record it receives.
EXTENSION = f"""#!{sys._base_executable}
import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"]


def call(path, body=None, headers=None, method="GET"):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(API + path, data=data, headers=headers or {{}}, method=method)
    with urllib.request.urlopen(request) as response:
        return response.headers, json.loads(response.read() or b"null")


class Listener(BaseHTTPRequestHandler):
    def do_POST(self):
        for record in json.loads(self.rfile.read(int(self.headers["Content-Length"]))):
            print("telemetry", record["type"], flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


headers, _ = call(
    "/2020-01-01/extension/register", {{"events": ["INVOKE", "SHUTDOWN"]}}, {{"Lambda-Extension-Name": "my-extension"}},
    "POST",
)
me = {{"Lambda-Extension-Identifier": headers["Lambda-Extension-Identifier"]}}
server = ThreadingHTTPServer(("127.0.0.1", 0), Listener)
threading.Thread(target=server.serve_forever, daemon=True).start()
destination = {{"protocol": "HTTP", "URI": f"http://sandbox.localdomain:{{server.server_address[1]}}"}}
subscription = {{"schemaVersion": "2022-12-13", "types": ["platform"], "buffering": {{"timeoutMs": 25}},
                "destination": destination}}
call("/2022-07-01/telemetry", subscription, me, "PUT")
while call("/2020-01-01/extension/event/next", headers=me)[1]["eventType"] != "SHUTDOWN":
    pass
"""

TEMPLATE = f"""\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Resources:
  HelloFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src/
      Handler: app.handler
      Runtime: {PYTHON_RUNTIME}
      Environment:
        Variables:
          GREETING: hello
"""

APP = """\
import os
import time


def handler(event, context):
    print(f"handling {event['name']}")
    time.sleep(event.get("sleep", 0))
    return {"message": f"{os.environ['GREETING']} {event['name']}"}
"""


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section, in order."""
    text = README.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"^```(\w+)\n(.*?)^```$", text[start:end], re.MULTILINE | re.DOTALL)


def test_the_section_shows_a_ten_line_extension_test_and_a_template_test() -> None:
    blocks = section_blocks()
    python = [code for language, code in blocks if language == "python"]
    assert [language for language, _ in blocks] == ["python", "python", "toml", "python", "text"]
    lines = [line for line in python[0].splitlines() if line.strip()]
    assert len(lines) <= 10, lines
    assert "layers=[LAYER]" in python[0] and "extension_events" in python[0]
    assert "wait_for_extension" in python[1]
    assert 'lambda_function("HelloFunction"' in python[2]


def test_the_examples_pass_as_written(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", HOME)  # where lambdabox caches the runtime clients
    blocks = section_blocks()
    toml = next(code for language, code in blocks if language == "toml")
    pytester.makefile(".toml", pyproject=toml + 'filterwarnings = ["error"]\naddopts = "--strict-markers"\n')
    for index, code in enumerate(code for language, code in blocks if language == "python"):
        pytester.makepyfile(**{f"test_readme_{index}": code})
    extension = pytester.path / "layer" / "extensions" / "my-extension"
    extension.parent.mkdir(parents=True)
    extension.write_text(EXTENSION)
    extension.chmod(0o755)
    (pytester.path / "template.yaml").write_text(TEMPLATE)
    (pytester.path / "src").mkdir()
    (pytester.path / "src" / "app.py").write_text(APP)
    result = pytester.runpytest()
    result.assert_outcomes(passed=4)
