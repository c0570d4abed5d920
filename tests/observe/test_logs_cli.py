"""``lambdabox logs`` as users run it, on what ``lambdabox invoke`` and ``start-lambda`` (real processes) kept:
sam logs' lines, one invoke by its request id, a time range and a text, and ``--tail`` following new lines."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from server_support import lambda_client, write_template

LAMBDABOX = [sys.executable, "-m", "lambdabox"]
WAIT_S = 60
FUNCTIONS = """
Fn:
  Type: AWS::Serverless::Function
  Properties: {Handler: handler.logs, FunctionName: my-function}
Busy:
  Type: AWS::Serverless::Function
  Properties: {Handler: invoke_handler.occupy}
"""
LINE = re.compile(r"^(\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


def lambdabox(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAMBDABOX_LOG_DIR": str(cwd / "logs")}
    argv = [*LAMBDABOX, *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT_S, check=False)


def invoked(tmp_path: Path, repeat: int = 2) -> list[str]:
    """Invoke Fn (FunctionName my-function); its request ids, in order."""
    done = lambdabox(tmp_path, "invoke", "Fn", "--repeat", str(repeat))
    assert done.returncode == 0, done.stderr
    return re.findall(r"^START RequestId: (\S+) ", done.stderr, re.MULTILINE)


def test_logs_prints_every_line_of_the_group_as_sam_logs_does(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    first, second = invoked(tmp_path)
    assert (tmp_path / "logs" / "%2Faws%2Flambda%2Fmy-function").is_dir()

    for args in (["Fn"], ["my-function"], ["Fn", "-t", "template.yaml"], [], ["/aws/lambda/my-function"]):
        done = lambdabox(tmp_path, "logs", *args)
        assert done.returncode == 0, (args, done.stderr)
        lines = done.stdout.splitlines()
        assert all(LINE.match(line) for line in lines if line != "line record")  # but a multi-line record's
        matches = [m for line in lines if (m := LINE.match(line))]
        messages = [m.group(3) for m in matches]
        assert messages[0] == "INIT_START Function: my-function Type: on-demand"
        assert messages.count(f"START RequestId: {first} Version: $LATEST") == 1
        assert f"END RequestId: {second}" in messages and "line one" in messages
        assert len({m.group(1) for m in matches}) == 1  # one environment, one stream


def test_request_id_shows_that_invoke_only(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    first, second = invoked(tmp_path)
    done = lambdabox(tmp_path, "logs", "Fn", "--request-id", second)
    assert done.returncode == 0, done.stderr
    messages = [m.group(3) for line in done.stdout.splitlines() if (m := LINE.match(line))]
    assert messages[0] == f"START RequestId: {second} Version: $LATEST"
    assert messages[-2:] == [f"END RequestId: {second}", messages[-1]]
    assert messages[-1].startswith(f"REPORT RequestId: {second}\t")
    assert "line one" in messages and "to stderr" in messages
    assert first not in done.stdout and "INIT_START" not in done.stdout


def test_filter_and_time_range(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    invoked(tmp_path)
    done = lambdabox(tmp_path, "logs", "Fn", "--filter", "REPORT RequestId")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and all("\tDuration: " in line for line in done.stdout.splitlines())
    assert lambdabox(tmp_path, "logs", "Fn", "-s", "1 hour ago").stdout.count("START RequestId: ") == 2
    assert lambdabox(tmp_path, "logs", "Fn", "--start-time", "2999-01-01T00:00:00").stdout == ""
    assert lambdabox(tmp_path, "logs", "Fn", "--end-time", "2000-01-01").stdout == ""
    bad = lambdabox(tmp_path, "logs", "Fn", "-s", "last tuesday")
    assert bad.returncode == 2 and "relative time" in bad.stderr


def test_no_logs_and_several_groups_are_told_clearly(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    missing = lambdabox(tmp_path, "logs", "Busy")
    assert missing.returncode == 1 and "no logs for /aws/lambda/" in missing.stderr
    none = lambdabox(tmp_path, "logs")
    assert none.returncode == 2 and "no log groups; name the FUNCTION" in none.stderr


class Lines:
    """A pipe's lines, read by a thread; ``wait_for`` has one deadline for the whole wait."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, fragment: str, within_s: float = WAIT_S) -> str:
        deadline = time.monotonic() + within_s
        while True:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"{fragment!r} never came:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if fragment in line:
                return line

    def rest(self) -> list[str]:
        """The lines not yet seen, up to the end of the stream (the process has exited)."""
        lines = []
        while (line := self._queue.get(timeout=WAIT_S)) is not None:
            lines.append(line)
        self.seen.extend(lines)
        return lines


@contextmanager
def running(cwd: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    env = {**os.environ, "LAMBDABOX_LOG_DIR": str(cwd / "logs")}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen([*LAMBDABOX, *args], cwd=cwd, env=env, text=True, **pipes) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            yield process, Lines(process.stdout), Lines(process.stderr)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT_S)


def test_tail_follows_lines_written_after_it_started_until_ctrl_c(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    (first,) = invoked(tmp_path, repeat=1)
    with running(tmp_path, "logs", "Fn", "--tail") as (process, out, err):
        out.wait_for(f"REPORT RequestId: {first}")  # what was there: it is running and has read the group
        (later,) = invoked(tmp_path, repeat=1)  # a new environment: a new stream, found by the tail
        out.wait_for(f"START RequestId: {later} ")
        out.wait_for(f"REPORT RequestId: {later}")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT_S) == 0
        assert err.rest() == []  # no traceback: Ctrl-C is the way out
    streams = {m.group(1) for line in out.seen if (m := LINE.match(line))}
    assert len(streams) == 2


def test_start_lambda_environments_running_together_write_streams_of_one_group(tmp_path: Path) -> None:
    write_template(tmp_path, FUNCTIONS)
    count = 3
    with running(tmp_path, "start-lambda", "-p", "0") as (process, out, _err):
        url = out.wait_for("serving the Lambda Invoke API on ").split(" on ", 1)[1].split(" ", 1)[0]
        answers: list[int] = []

        def call(client: Any) -> None:
            response = client.invoke(FunctionName="Busy", Payload=json.dumps({"seconds": 1}).encode())
            answers.append(response["StatusCode"] if "FunctionError" not in response else 0)

        clients = [lambda_client(url) for _ in range(count)]  # made first: the invokes start together
        threads = [threading.Thread(target=call, args=(client,), daemon=True) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        assert answers == [200] * count
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT_S) == 0
    done = lambdabox(tmp_path, "logs", "Busy")
    assert done.returncode == 0, done.stderr
    starts = [m for line in done.stdout.splitlines() if (m := LINE.match(line)) and m.group(3).startswith("START ")]
    assert len(starts) == count and len({m.group(1) for m in starts}) == count
    assert done.stdout.count("occupying ") == count
