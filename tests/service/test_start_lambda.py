"""``lambdabox start-lambda`` as users run it: a real process on loopback, the AWS CLI and boto3 as they are, and a
graceful SIGTERM (the invoke in flight finishes, every extension gets SHUTDOWN, exit status 0)."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import psutil
from botocore.exceptions import EndpointConnectionError

from lambdabox.sandbox import leftovers
from lambdabox.sandbox.cgroups import CGROUP_ROOT, V2_PARENT
from server_support import aws_cli, lambda_client, write_template

LAMBDABOX = [sys.executable, "-m", "lambdabox"]
FUNCTIONS = """
Echo:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.context}
Busy:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.occupy}
Fail:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.fail}
"""
WAIT_S = 30


class Lines:
    """A pipe's lines, read by a thread, awaited with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, fragment: str, within_s: float = WAIT_S) -> str:
        while True:
            line = self._queue.get(timeout=within_s)
            if line is None:
                raise AssertionError(f"{fragment!r} never came:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if fragment in line:
                return line

    def rest(self) -> list[str]:
        """Everything up to the end of the stream (the process has exited)."""
        self._thread.join(timeout=WAIT_S)
        while (line := self._queue.get(timeout=WAIT_S)) is not None:
            self.seen.append(line)
        return self.seen


@contextmanager
def start_lambda(template: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, Lines, Lines]]:
    argv = [*LAMBDABOX, "start-lambda", "-t", str(template), "-p", "0", *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(argv, cwd=template.parent, text=True, **pipes) as process:
        assert process.stdout is not None and process.stderr is not None
        out, err = Lines(process.stdout), Lines(process.stderr)
        try:
            line = out.wait_for("serving the Lambda Invoke API on ")
            url = line.split(" on ", 1)[1].split(" ", 1)[0]
            yield process, url, out, err
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT_S)


def test_the_aws_cli_and_boto3_then_sigterm_lets_the_invoke_finish_and_shuts_down(tmp_path: Path) -> None:
    template = write_template(tmp_path, FUNCTIONS, extension=True)
    page = tmp_path / "timeline.html"
    with start_lambda(template, "--retry-delay-scale", "0.01", "--timeline", str(page)) as (process, url, out, err):
        assert urlsplit(url).hostname == "127.0.0.1"  # loopback unless told otherwise
        assert str(tmp_path / ".lambdabox" / "destinations.jsonl") in out.wait_for("asynchronous destinations")

        result = tmp_path / "out.json"
        done = aws_cli(url, "invoke", "--function-name", "Echo", "--payload", '{"a": 1}', "--log-type", "Tail",
                       str(result))  # fmt: skip
        assert done.returncode == 0, done.stderr
        meta = json.loads(done.stdout)
        assert meta["StatusCode"] == 200 and meta["ExecutedVersion"] == "$LATEST"
        assert "REPORT RequestId: " in base64.b64decode(meta["LogResult"]).decode()
        assert json.loads(result.read_text())["event"] == {"a": 1}

        failed = aws_cli(url, "invoke", "--function-name", "Fail", str(result))
        assert failed.returncode == 0 and json.loads(failed.stdout)["FunctionError"] == "Unhandled"
        assert json.loads(result.read_text())["errorMessage"] == "boom"
        queued = aws_cli(url, "invoke", "--function-name", "Echo", "--invocation-type", "Event", str(result))
        assert json.loads(queued.stdout)["StatusCode"] == 202
        dry = aws_cli(url, "invoke", "--function-name", "Echo", "--invocation-type", "DryRun", str(result))
        assert json.loads(dry.stdout)["StatusCode"] == 204
        missing = aws_cli(url, "invoke", "--function-name", "Nope", str(result))
        assert missing.returncode == 255 and "(ResourceNotFoundException)" in missing.stderr

        answers: list[Any] = []
        client = lambda_client(url)
        slow = threading.Thread(
            target=lambda: answers.append(client.invoke(FunctionName="Busy", Payload=b'{"seconds": 2}')), daemon=True
        )
        slow.start()
        err.wait_for("occupying ")  # the invoke is in flight
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0, "\n".join(err.rest())
        slow.join(timeout=WAIT_S)
        assert answers and answers[0]["StatusCode"] == 200 and "FunctionError" not in answers[0]
        assert json.loads(answers[0]["Payload"].read())["others_in_tmp"] == []
        logs = err.rest()
        registered = [line for line in logs if '"what": "registered"' in line]
        spindowns = [line for line in logs if '"shutdownReason": "spindown"' in line]
        assert len(registered) == len(spindowns) >= 3, "\n".join(logs)  # at least Echo, Fail and Busy
        with socket.socket() as probe:
            address = urlsplit(url)
            assert probe.connect_ex((address.hostname or "", address.port or 0)) != 0  # no longer listening
    # --timeline: each environment's Init, invokes and shutdown, in sections named after their environment
    headings = re.findall(r"<h2>(.*?)</h2>", page.read_text())
    assert "lambdabox timeline: start-lambda (Echo, Busy, Fail)" in page.read_text()
    for function in ("Echo", "Busy", "Fail"):
        mine = [h for h in headings if h.startswith(f"{function} environment 1: ")]
        assert [h.split(": ", 1)[1].split(" ")[0] for h in mine][:2] == ["Init", "Invoke"], headings
        assert mine[-1].startswith(f"{function} environment 1: Shutdown (spindown)"), headings
    invokes = [h for h in headings if ": Invoke " in h]
    assert len(invokes) >= 3 and all(re.search(r": Invoke \d+ <code>[0-9a-f-]{36}</code>$", h) for h in invokes)


def test_sigint_on_an_idle_server_exits_0(tmp_path: Path) -> None:
    template = write_template(tmp_path, FUNCTIONS)
    with start_lambda(template, "--host", "127.0.0.1") as (process, _url, _out, err):
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=WAIT_S) == 0
        assert any("stopping" in line for line in err.rest())


def left_by(owner: str) -> list[Path]:
    """The temporary directories and cgroups named after the lambdabox process ``owner`` (see leftovers)."""
    places = [Path(tempfile.gettempdir())]
    places += [CGROUP_ROOT / "freezer", CGROUP_ROOT / "memory", CGROUP_ROOT / V2_PARENT]
    return [path for place in places if place.is_dir() for path in place.iterdir() if f"{owner}-" in path.name]


def alive(process: psutil.Process) -> bool:
    """Still running (a zombie that its new parent has not reaped yet is not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped meanwhile
        return False


def in_tmp_of(paths: list[Path]) -> list[Path]:
    return [path for path in paths if path.parent == Path(tempfile.gettempdir())]


def test_what_a_killed_server_left_the_next_lambdabox_removes_and_says(tmp_path: Path) -> None:
    template = write_template(tmp_path, FUNCTIONS)
    with start_lambda(template) as (process, url, _out, _err):
        owner = leftovers.owner(process.pid)
        assert lambda_client(url).invoke(FunctionName="Echo", Payload=b"{}")["StatusCode"] == 200
        deadline = time.monotonic() + WAIT_S  # the holder for the next environment is started a moment later
        while len(in_tmp_of(left_by(owner))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        environment = psutil.Process(process.pid).children(recursive=True)  # frozen now, where cgroups freeze
        process.kill()
        process.wait(timeout=WAIT_S)
    left = left_by(owner)
    assert len(in_tmp_of(left)) == 3, left  # work, files, and the files of the holder started for the next environment

    argv = [*LAMBDABOX, "invoke", "-t", str(template), "Echo"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^lambdabox: removed \d+ temporary directories in .* left by lambdabox processes that are gone$",
                     done.stderr, re.MULTILINE), done.stderr  # fmt: skip
    cgroups = {path.parent for path in left} - {Path(tempfile.gettempdir())}
    for parent in cgroups:
        assert re.search(rf"^lambdabox: removed .* in {parent} left by", done.stderr, re.MULTILINE), done.stderr
    assert left_by(owner) == []
    assert [p for p in environment if alive(p)] == []


def test_a_bad_template_is_refused_before_anything_listens(tmp_path: Path) -> None:
    template = write_template(tmp_path, FUNCTIONS.replace("invoke_handler.context}", "x, Timeout: 901}"))
    argv = [*LAMBDABOX, "start-lambda", "-t", str(template), "-p", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert str(template) in done.stderr and "Echo" in done.stderr and "Timeout" in done.stderr


def test_sigterm_right_after_a_burst_answers_every_caller(tmp_path: Path) -> None:
    """20 invokes sent at once, SIGTERM at once: each caller gets its answer, or (connecting after the server stopped
    listening) a refused connection; none has its request taken and its connection closed unanswered."""
    template = write_template(tmp_path, FUNCTIONS, extension=True)
    for _ in range(2):
        with start_lambda(template) as (process, url, _, err):
            client = lambda_client(url)

            def call(client: Any = client) -> str:
                try:
                    return str(client.invoke(FunctionName="Echo", Payload=b"{}")["StatusCode"])
                except EndpointConnectionError:
                    return "refused"
                except Exception as error:
                    return repr(error)

            with ThreadPoolExecutor(20) as callers:
                calls = [callers.submit(call) for _ in range(20)]
                os.kill(process.pid, signal.SIGTERM)
                answers = [c.result(timeout=WAIT_S) for c in calls]
            assert process.wait(timeout=WAIT_S) == 0, "\n".join(err.rest())
            assert set(answers) <= {"200", "refused"}, answers


def test_open_ahead_serves_each_functions_first_cold_start_from_an_environment_opened_before_it(
    tmp_path: Path,
) -> None:
    template = write_template(tmp_path, FUNCTIONS)
    with start_lambda(template, "--open-ahead") as (process, url, _out, err):
        owner = leftovers.owner(process.pid)
        opened = len(in_tmp_of(left_by(owner)))  # listening: each function's environment is open already
        answer = lambda_client(url).invoke(FunctionName="Echo", Payload=b'{"n": 1}', LogType="Tail")
        assert answer["StatusCode"] == 200 and "FunctionError" not in answer
        tail = base64.b64decode(answer["LogResult"]).decode()
        assert "Init Duration:" in tail  # Init is the invoke's, as in Lambda
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 0, err.rest()
    assert opened >= 2  # an environment's work and holder directories, before any invoke
    assert left_by(owner) == []
