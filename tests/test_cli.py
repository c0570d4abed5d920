"""The ``lambdabox invoke`` command as users run it: a real process, a SAM template, stdout and stderr."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

from support import FIXTURES, PYTHON, extension_script

LAMBDABOX = [sys.executable, "-m", "lambdabox"]


def write_template(tmp_path: Path, handler: str = "handler.ok", extra_env: str = "", layers: str = "") -> Path:
    code = tmp_path / "src"
    code.mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "handler.py", code / "handler.py")
    ext_dir = tmp_path / "layer" / "extensions"
    ext_dir.mkdir(parents=True, exist_ok=True)
    (ext_dir / "watcher").write_bytes(extension_script("ext.py"))
    (ext_dir / "watcher").chmod(0o755)
    template = tmp_path / "template.yaml"
    template.write_text(
        f"""
Transform: AWS::Serverless-2016-10-31
Parameters:
  Stage: {{Type: String, Default: dev}}
Globals:
  Function: {{Timeout: 30, MemorySize: 256}}
Resources:
  Ext:
    Type: AWS::Serverless::LayerVersion
    Properties: {{ContentUri: layer/}}
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src/
      Handler: {handler}
      Runtime: {PYTHON}
      Layers: [!Ref Ext{layers}]
      Environment:
        Variables:
          STAGE: !Sub "${{Stage}}-${{AWS::Region}}"{extra_env}
"""
    )
    return template


def lambdabox(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*LAMBDABOX, *args], input=stdin, capture_output=True, timeout=timeout, check=False)


def test_invoke_prints_one_response_per_line_and_lambda_log_lines(tmp_path: Path) -> None:
    template = write_template(tmp_path)
    event = tmp_path / "event.json"
    event.write_text('{"hello": "world"}')
    done = lambdabox("invoke", "Fn", "-t", str(template), "-e", str(event), "--repeat", "3")
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"ok": True, "event": {"hello": "world"}}] * 3
    stderr = done.stderr.decode()
    assert stderr.count("START RequestId: ") == 3 and stderr.count("END RequestId: ") == 3
    reports = [line for line in stderr.splitlines() if line.startswith("REPORT RequestId: ")]
    assert len(reports) == 3
    assert "Init Duration: " in reports[0] and "Init Duration: " not in reports[1]
    assert "Memory Size: 256 MB" in reports[0] and "Max Memory Used: " in reports[0]
    assert '"shutdownReason": "spindown"' in stderr  # the extension got SHUTDOWN at the end


def test_event_from_stdin_and_default_function(tmp_path: Path) -> None:
    template = write_template(tmp_path, "handler.echo_env")
    done = lambdabox("invoke", "-t", str(template), "-e", "-", stdin=b'{"keys": ["STAGE"]}')
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["STAGE"] == "dev-us-east-1"


def test_function_error_exits_1_with_the_error_object(tmp_path: Path) -> None:
    done = lambdabox("invoke", "-t", str(write_template(tmp_path, "handler.fail")))
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "boom"


def test_bad_template_is_refused_before_anything_starts(tmp_path: Path) -> None:
    template = write_template(tmp_path, layers=", arn:aws:lambda:us-east-1:123456789012:layer:x:1")
    done = lambdabox("invoke", "-t", str(template))
    assert done.returncode == 1
    message = done.stderr.decode()
    assert str(template) in message and "Fn" in message and "arn:" in message
    assert "START" not in message and done.stdout == b""


def test_layer_with_path_traversal_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escaped.txt", "x")
    template = write_template(tmp_path, layers=", evil.zip")
    done = lambdabox("invoke", "-t", str(template))
    assert done.returncode == 1
    assert "evil.zip" in done.stderr.decode() and "START" not in done.stderr.decode()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_ctrl_c_shuts_down_cleanly(tmp_path: Path) -> None:
    template = write_template(tmp_path, "handler.sleep")
    with subprocess.Popen(
        [*LAMBDABOX, "invoke", "-t", str(template), "-e", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(b'{"seconds": 60}')
        process.stdin.close()
        seen = []
        for raw in process.stderr:  # wait (bounded by the handler's 60 s) until the invoke has started
            seen.append(raw.decode())
            if raw.startswith(b"START RequestId"):
                break
        os.kill(process.pid, signal.SIGINT)
        rest = process.stderr.read().decode()
        assert process.wait(timeout=30) == 1
    assert '"shutdownReason": "spindown"' in rest, "".join(seen) + rest
