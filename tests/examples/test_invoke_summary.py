"""examples/invoke-summary: the extension's one-line summaries, as ``lambdabox invoke`` shows them, against the
REPORT lines of the same run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "invoke-summary"
REPORT = re.compile(
    r"REPORT RequestId: (?P<id>\S+)\tDuration: (?P<duration>[\d.]+) ms\tBilled Duration: (?P<billed>\d+) ms\t"
    r"Memory Size: (?P<size>\d+) MB\tMax Memory Used: (?P<memory>\d+) MB(?:\tInit Duration: (?P<init>[\d.]+) ms)?"
)
SUMMARY = re.compile(
    r"\[invoke-summary\] invoke (?P<id>\S+): duration (?P<duration>[\d.]+) ms, billed (?P<billed>\d+) ms, "
    r"max memory (?P<memory>\d+) of (?P<size>\d+) MB(?:, init (?P<init>[\d.]+) ms)?"
)
SHUTDOWN = re.compile(
    r"\[invoke-summary\] SHUTDOWN \(spindown\): (?P<count>\d+) invokes, duration total (?P<total>[\d.]+) ms, "
    r"avg (?P<avg>[\d.]+) ms, max (?P<max>[\d.]+) ms, billed total (?P<billed>\d+) ms, max memory (?P<memory>\d+) MB"
)


def test_a_line_per_invoke_and_one_at_shutdown_agree_with_the_reports() -> None:
    command = [sys.executable, "-m", "lambdabox", "invoke", "-t", str(EXAMPLE / "template.yaml")]
    command += ["-e", str(EXAMPLE / "event.json"), "--repeat", "3"]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert [json.loads(line) for line in done.stdout.decode().splitlines()] == [{"below": 200000, "primes": 17984}] * 3
    lines = stderr.splitlines()

    reports = [m.groupdict() for line in lines if (m := REPORT.fullmatch(line))]
    summaries = [m.groupdict() for line in lines if (m := SUMMARY.fullmatch(line))]
    assert len(reports) == 3 and reports[0]["init"] is not None
    assert summaries == reports  # the same request ids, in order, with the same figures, once each

    (shutdown_line,) = [i for i, line in enumerate(lines) if line.startswith("[invoke-summary] SHUTDOWN")]
    assert shutdown_line > max(i for i, line in enumerate(lines) if SUMMARY.fullmatch(line))
    shutdown = SHUTDOWN.fullmatch(lines[shutdown_line])
    assert shutdown, lines[shutdown_line]
    durations = [float(r["duration"]) for r in reports]
    assert int(shutdown["count"]) == 3
    assert abs(float(shutdown["total"]) - sum(durations)) <= 0.02  # the REPORT lines round each to 0.01 ms
    assert abs(float(shutdown["avg"]) - sum(durations) / 3) <= 0.01
    assert shutdown["max"] == max(reports, key=lambda r: float(r["duration"]))["duration"]
    assert int(shutdown["billed"]) == sum(int(r["billed"]) for r in reports)
    assert int(shutdown["memory"]) == max(int(r["memory"]) for r in reports)
