"""The local log store: real environments write their records to Lambda's log group and stream, as CloudWatch keeps
them; names survive the trip to the file system exactly; reads are bounded and merge streams in time order."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lambdabox.environment.report import TelemetryEvent
from lambdabox.observe.logstore import (
    LogStore,
    StreamRecorder,
    decode_name,
    encode_name,
    group_name,
    open_logged_environment,
)
from server_support import serving, write_template
from support import make_function, run

STREAM = re.compile(r"^\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}$")


def stored(store: LogStore, group: str, stream: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.path(group, stream).read_text().splitlines()]


@pytest.mark.parametrize(
    "name",
    ["/aws/lambda/my-function_1", "2024/05/01/[$LATEST]0123456789abcdef0123456789abcdef", "..", ".", "a%2Fb", "é ü/漢"],
)
def test_names_become_safe_file_names_and_come_back_exactly(name: str) -> None:
    encoded = encode_name(name)
    assert re.fullmatch(r"[A-Za-z0-9_%-]+", encoded)  # no '/', '[', '$', '.', nothing the shell or the FS minds
    assert decode_name(encoded) == name


def test_names_too_long_for_a_file_are_refused() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode_name("/" * 100)
    with pytest.raises(ValueError, match="empty"):
        encode_name("")


def test_an_environment_keeps_its_lines_in_its_stream_as_cloudwatch_does(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    config = make_function(tmp_path, "handler.logs", extensions={"watcher": "ext.py"})
    group = group_name(config.function_name)

    async def main() -> tuple[str, list[str], list[str]]:
        async with open_logged_environment(config, None, (), store) as env:
            first = await env.invoke(b"{}")
            on_disk = [e.message for e in store.events(group)]  # REPORT is written out by the time invoke returns
            second = await env.invoke(b"{}")
            return env.log_stream, [first.request_id, second.request_id], on_disk

    stream, request_ids, after_first = run(main())
    assert store.groups() == ["/aws/lambda/Fn"] and store.streams(group) == [stream]
    assert STREAM.match(stream)
    assert (tmp_path / "logs" / "%2Faws%2Flambda%2FFn").is_dir()
    assert after_first[-1].startswith(f"REPORT RequestId: {request_ids[0]}\t")

    events = stored(store, group, stream)
    assert all(set(e) == {"timestamp", "message", "ingestionTime"} for e in events)
    assert all(e["ingestionTime"] >= e["timestamp"] for e in events)
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    messages = [e["message"] for e in events]
    assert messages[0] == "INIT_START Function: Fn Type: on-demand"
    assert "EXTENSION\tName: watcher\tState: Ready\tEvents: [INVOKE, SHUTDOWN]" in messages
    for request_id in request_ids:
        start = messages.index(f"START RequestId: {request_id} Version: $LATEST")
        end = messages.index(f"END RequestId: {request_id}")
        assert messages[end + 1].startswith(f"REPORT RequestId: {request_id}\tDuration: ")  # END, REPORT: two events
        between = messages[start:end]
        assert "line one" in between and "first" in between and "second" in between and "to stderr" in between
        assert any(m.startswith("[watcher] ") and '"eventType": "INVOKE"' in m for m in between)
        assert any("multi\nline record" in m for m in between)  # one record, one event
    assert "Init Duration: " in messages[messages.index(f"END RequestId: {request_ids[0]}") + 1]
    assert any('"shutdownReason": "spindown"' in m for m in messages)  # written during shutdown, kept too


def test_the_stream_is_the_one_the_function_is_told(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    config = make_function(tmp_path, "handler.echo_env")

    async def main() -> tuple[str, dict[str, Any]]:
        async with open_logged_environment(config, None, (), store) as env:
            keys = ["AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME"]
            result = await env.invoke(json.dumps({"keys": keys}).encode())
            return env.log_stream, json.loads(getattr(result.outcome, "body", b"null"))

    stream, seen = run(main())
    assert seen["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/Fn" and seen["AWS_LAMBDA_LOG_STREAM_NAME"] == stream
    assert store.streams("/aws/lambda/Fn") == [stream]


def test_several_environments_of_a_pool_write_several_streams_of_one_group(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs")
    template = write_template(
        tmp_path, "Busy:\n  Type: AWS::Serverless::Function\n  Properties: {Handler: invoke_handler.occupy}\n"
    )
    count = 3

    async def main() -> str:
        async with serving(template, logs=store) as served:
            calls = (asyncio.to_thread(served.client().invoke, FunctionName="Busy", Payload=b'{"seconds": 1}')
                     for _ in range(count))  # fmt: skip
            answers = await asyncio.gather(*calls)  # at the same time: an environment each
            assert all(a["StatusCode"] == 200 and "FunctionError" not in a for a in answers)
            assert served.server.pools["Busy"].environments == count
            return served.server.template.functions["Busy"].function_name

    function_name = run(main())
    group = group_name(function_name)
    assert store.groups() == [group]
    streams = store.streams(group)
    assert len(streams) == count and all(STREAM.match(s) for s in streams)
    for stream in streams:
        messages = [e["message"] for e in stored(store, group, stream)]
        assert sum(m.startswith("START RequestId: ") for m in messages) == 1
        assert sum(m.startswith("REPORT RequestId: ") for m in messages) == 1
        assert any(m.startswith("occupying ") for m in messages)
    assert sum(1 for _ in store.events(group)) == sum(len(stored(store, group, s)) for s in streams)


def event(at_ms: int, text: str, type_: str = "function") -> TelemetryEvent:
    return TelemetryEvent(at_ms / 1000, type_, text)


def test_a_recorder_keeps_what_comes_before_its_stream_is_named_and_counts_what_comes_after_close(
    tmp_path: Path,
) -> None:
    store = LogStore(tmp_path)
    with store.recorder("Fn") as recorder:
        recorder(event(1000, "early"))
        recorder(TelemetryEvent(1.001, "platform.runtimeDone", {"requestId": "r"}))  # no line of its own
        assert not store.groups()
        recorder.attach("s")
        recorder(event(1002, "later"))
    recorder(event(1003, "too late"))
    assert [(e.timestamp, e.message) for e in store.events("/aws/lambda/Fn")] == [(1000, "early"), (1002, "later")]
    assert recorder.dropped == 1


def test_a_store_that_cannot_be_written_is_reported_once_and_never_breaks_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory")
    recorder = StreamRecorder(LogStore(tmp_path / "file"), "/aws/lambda/Fn")
    recorder.attach("s")
    for i in range(3):
        recorder(event(1000 + i, "line"))
        recorder.flush()
    recorder.close()
    assert recorder.dropped == 3
    assert capsys.readouterr().err.count("lambdabox: cannot keep logs in ") == 1


def test_reads_leave_a_line_being_written_for_later_and_skip_a_torn_one(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    path = store.path("/aws/lambda/Fn", "s")
    path.parent.mkdir(parents=True)
    whole = '{"timestamp":1,"message":"one","ingestionTime":1}\n'
    path.write_text(whole + '{"timestamp":2,"mess')
    events, offset = store.read("/aws/lambda/Fn", "s")
    assert [e.message for e in events] == ["one"] and offset == len(whole)
    with path.open("a") as file:
        file.write('age":"two"}\n{"torn\n{"timestamp":3,"message":"three","ingestionTime":4}\n')
    events, _ = store.read("/aws/lambda/Fn", "s", offset)
    assert [(e.message, e.ingestion_time) for e in events] == [("two", 0), ("three", 4)]


def test_streams_are_merged_in_time_order(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    for stream, times in {"a": [1, 4, 5], "b": [2, 3, 6]}.items():
        with store.recorder("Fn") as recorder:
            recorder.attach(stream)
            for at in times:
                recorder(event(at, f"{stream}{at}"))
    assert [e.message for e in store.events("/aws/lambda/Fn")] == ["a1", "b2", "b3", "a4", "a5", "b6"]
    assert sorted(store.streams("/aws/lambda/Fn")) == ["a", "b"]
